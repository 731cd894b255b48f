"""Input conventions and param checks that every built-in head shares.

* 4-D maps ``(N, C, H, W)`` in float16/float32/float64; 2-D input ``(N, C)``
  is read as ``(N, C, 1, 1)``: a pooled vector is a 1x1 map. This lets
  scikit-learn's estimator checks (which only produce 2-D data) run against the
  torch heads, and lets every head read pooled vectors.
* ``n_features_in_`` is the channel count ``C`` (``X.shape[1]``), as for any
  scikit-learn estimator.
* Labels may be strings or integers; ``classes_`` holds them sorted and
  ``predict`` returns values of the same type.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets

from transferlab.config import ParamsError

# Accepted input dtypes; anything else (ints, objects) is converted to the first.
FLOAT_DTYPES = (np.float32, np.float16, np.float64)
CLASS_WEIGHTS = (None, "balanced")
SEED_UPPER = np.iinfo(np.int32).max


def seed_from(random_state: Any) -> int:
    """Turn a scikit-learn ``random_state`` into one int seed.

    An int is used as is (so a reference computation can reproduce it); None
    or a RandomState draws one, following scikit-learn's conventions.
    """
    if isinstance(random_state, (int, np.integer)) and not isinstance(random_state, bool):
        return int(random_state)
    return int(check_random_state(random_state).randint(SEED_UPPER))


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ParamsError(message)


def is_int(value: Any, minimum: int) -> bool:
    # bool is an int subclass, but True as an epoch count is surely a mistake.
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int) -> None:
    check(is_int(value, minimum), f"{name}: got {value!r}; allowed: an int >= {minimum}")


def check_class_weight(value: Any) -> None:
    check(
        value is None or (isinstance(value, str) and value in CLASS_WEIGHTS),
        f"class_weight: got {value!r}; allowed: one of {', '.join(map(repr, CLASS_WEIGHTS))}",
    )


def encode_labels(y: NDArray[Any]) -> tuple[NDArray[Any], NDArray[np.int64]]:
    check_classification_targets(y)
    classes, y_idx = np.unique(y, return_inverse=True)
    return classes, y_idx.astype(np.int64)


def encode_known(classes: NDArray[Any], y: ArrayLike) -> NDArray[np.int64]:
    """Map labels onto indices of ``classes``; refuse labels unseen in training."""
    y = np.asarray(y).ravel()
    idx = np.searchsorted(classes, y)
    known = (idx < len(classes)) & (classes[np.minimum(idx, len(classes) - 1)] == y)
    if not known.all():
        unseen = sorted(set(np.asarray(y)[~known].tolist()))
        raise ValueError(
            f"eval_set has labels not seen in training: {unseen}; training classes: {classes.tolist()}"
        )
    return idx.astype(np.int64)


def as_maps(X: NDArray[Any]) -> NDArray[Any]:
    """View validated input as ``(N, C, H, W)``; 2-D ``(N, C)`` becomes ``(N, C, 1, 1)``."""
    if X.ndim == 2:
        return X[:, :, None, None]
    if X.ndim != 4:
        raise ValueError(f"expected maps of shape (N, C, H, W) or vectors (N, C); got shape {X.shape}")
    return X


def pool(X: NDArray[Any]) -> NDArray[Any]:
    """Mean over H, W of 4-D maps (in float64 for accuracy); 2-D vectors pass through."""
    return X if X.ndim == 2 else as_maps(X).mean(axis=(2, 3), dtype=np.float64)
