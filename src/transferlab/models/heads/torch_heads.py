"""Classifier heads trained on cached backbone feature maps.

Three scikit-learn compatible estimators read the same cached tensors:

* :class:`LinearHead` -- flatten the maps ``(N, C, H, W)``, then a small MLP
  (``Dense(hidden, ReLU) -> Dropout -> Dense``) with softmax outputs.
* :class:`GapHead` -- global average pooling ``(N, C, H, W) -> (N, C)`` and one
  linear softmax layer; exposes class activation maps through :meth:`GapHead.cam`.
* :class:`SvmHead` -- standardized pooled vectors ``(N, C)`` into ``LinearSVC``.

Input conventions (all heads):

* 4-D maps ``(N, C, H, W)`` in float16/float32/float64; computation is float32
  for the torch heads (batches are cast one at a time, so a float16 cache is
  never expanded to float32 as a whole).
* 2-D input ``(N, C)`` is read as ``(N, C, 1, 1)``: a pooled vector is a 1x1
  map. This lets scikit-learn's estimator checks (which only produce 2-D data)
  run against the torch heads, and lets every head read pooled vectors.
* ``n_features_in_`` is the channel count ``C`` (``X.shape[1]``), as for any
  scikit-learn estimator; the full map shape is kept in ``input_shape_``.
* Labels may be strings or integers; ``classes_`` holds them sorted and
  :meth:`predict` returns values of the same type.

Persistence: ``head.save(path)`` writes ``path`` (safetensors with the arrays)
and a JSON sidecar ``<path>.json`` (class, params, classes, shapes, history and
the sha256 of ``path``); :func:`load_head` reads both back without unpickling
anything. Each file is written atomically; the checksum in the sidecar catches
a pair that does not belong together (e.g. a crash between the two renames).
"""

from __future__ import annotations

import copy
import json
import math
from abc import ABCMeta, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike, NDArray
from scipy.special import expit, softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from sklearn.utils import check_random_state
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn

from transferlab.config import ParamsError
from transferlab.io import atomic_path, atomic_write_json, sha256_file

__all__ = [
    "GapHead",
    "GapNet",
    "LinearNet",
    "LinearHead",
    "SvmHead",
    "TrainConfig",
    "load_head",
    "make_head",
    "predict_logits",
    "train_module",
]

# Accepted input dtypes; anything else (ints, objects) is converted to the first.
FLOAT_DTYPES = (np.float32, np.float16, np.float64)
CLASS_WEIGHTS = (None, "balanced")
# Bumped when the on-disk layout changes, so old files fail with a clear message.
FORMAT_VERSION = 1
SEED_UPPER = np.iinfo(np.int32).max


# --------------------------------------------------------------------------- helpers


def _seed_from(random_state: Any) -> int:
    """Turn a scikit-learn ``random_state`` into one int seed.

    An int is used as is (so a reference computation can reproduce it); None
    or a RandomState draws one, following scikit-learn's conventions.
    """
    if isinstance(random_state, (int, np.integer)) and not isinstance(random_state, bool):
        return int(random_state)
    return int(check_random_state(random_state).randint(SEED_UPPER))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ParamsError(message)


def _is_int(value: Any, minimum: int) -> bool:
    # bool is an int subclass, but True as an epoch count is surely a mistake.
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int) -> None:
    _check(_is_int(value, minimum), f"{name}: got {value!r}; allowed: an int >= {minimum}")


def _check_class_weight(value: Any) -> None:
    _check(
        value is None or (isinstance(value, str) and value in CLASS_WEIGHTS),
        f"class_weight: got {value!r}; allowed: one of {', '.join(map(repr, CLASS_WEIGHTS))}",
    )


def _encode_labels(y: NDArray[Any]) -> tuple[NDArray[Any], NDArray[np.int64]]:
    check_classification_targets(y)
    classes, y_idx = np.unique(y, return_inverse=True)
    return classes, y_idx.astype(np.int64)


def _encode_known(classes: NDArray[Any], y: ArrayLike) -> NDArray[np.int64]:
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


def _as_maps(X: NDArray[Any]) -> NDArray[Any]:
    """View validated input as ``(N, C, H, W)``; 2-D ``(N, C)`` becomes ``(N, C, 1, 1)``."""
    if X.ndim == 2:
        return X[:, :, None, None]
    if X.ndim != 4:
        raise ValueError(f"expected maps of shape (N, C, H, W) or vectors (N, C); got shape {X.shape}")
    return X


def _pool(X: NDArray[Any]) -> NDArray[Any]:
    """Mean over H, W of 4-D maps (in float64 for accuracy); 2-D vectors pass through."""
    return X if X.ndim == 2 else _as_maps(X).mean(axis=(2, 3), dtype=np.float64)


def _plain(value: Any) -> Any:
    """Convert numpy scalars/arrays to JSON-native values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _sidecar(path: Path) -> Path:
    # Appending (rather than replacing the suffix) can never collide with ``path``.
    return path.with_name(path.name + ".json")


def _saved_params(estimator: BaseEstimator) -> dict[str, Any]:
    params = {k: _plain(v) for k, v in estimator.get_params(deep=False).items()}
    if not (params.get("random_state") is None or isinstance(params["random_state"], int)):
        # A RandomState object cannot be stored; the saved weights do not need it.
        params["random_state"] = None
    return params


def _write_pair(path: str | Path, data: bytes, meta: dict[str, Any]) -> None:
    """Write the serialized arrays, then the sidecar naming their checksum."""
    path = Path(path)
    with atomic_path(path, suffix=".safetensors") as tmp:
        tmp.write_bytes(data)  # into the prepared temp file: keeps the mode atomic_path gave it
        meta = {**meta, "sha256": sha256_file(tmp)}
    atomic_write_json(_sidecar(path), meta)


# --------------------------------------------------------------------- torch modules


class LinearNet(nn.Sequential):
    """``Flatten -> Dense(hidden, ReLU) -> Dropout -> Dense``, mapping maps to logits.

    With ``hidden == 0`` it is ``Flatten -> Dropout -> Dense`` (dropout on the inputs).
    """

    def __init__(self, in_features: int, hidden: int, n_classes: int, dropout: float) -> None:
        layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
        if hidden > 0:
            layers += [("fc1", nn.Linear(in_features, hidden)), ("relu", nn.ReLU())]
        layers += [("dropout", nn.Dropout(dropout)), ("fc", nn.Linear(hidden or in_features, n_classes))]
        super().__init__(OrderedDict(layers))


class GapNet(nn.Module):
    """``features -> global average pool -> dropout -> fc``, mapping maps to logits.

    ``features`` is an identity on cached maps; fine-tuning can swap a backbone
    into that slot and :meth:`cam` keeps working on the backbone's last maps.
    """

    def __init__(self, channels: int, n_classes: int, dropout: float) -> None:
        super().__init__()
        self.features: nn.Module = nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.flatten(self.pool(self.features(x)))))

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        """Class activation maps ``(N, K, H, W)``: fc weights applied at every position.

        Because pooling and fc are both linear, ``cam(x).mean((2, 3))`` equals the
        logits minus the fc bias (in eval mode).
        """
        return torch.einsum("kc,nchw->nkhw", self.fc.weight, self.features(x))


# ------------------------------------------------------------------ shared training


@dataclass(frozen=True)
class TrainConfig:
    lr: float
    weight_decay: float
    max_epochs: int
    batch_size: int
    patience: int
    seed: int


@dataclass(frozen=True)
class TrainResult:
    history: list[dict[str, Any]]
    best_epoch: int


def _batches(
    X: NDArray[Any], order: NDArray[np.int64], batch_size: int
) -> Iterator[tuple[NDArray[np.int64], torch.Tensor]]:
    """Yield (indices, float32 tensor) per batch; the cast happens per batch to save memory."""
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield idx, torch.from_numpy(np.ascontiguousarray(X[idx], dtype=np.float32))


def predict_logits(module: nn.Module, X: NDArray[Any], batch_size: int) -> torch.Tensor:
    """Eval-mode logits of ``module`` on maps ``X``, computed batch by batch."""
    module.eval()
    with torch.no_grad():
        order = np.arange(len(X))
        return torch.cat([module(xb) for _, xb in _batches(X, order, batch_size)])


def _evaluate(
    module: nn.Module, X: NDArray[Any], y: torch.Tensor, weight: torch.Tensor | None, batch_size: int
) -> tuple[float, float]:
    logits = predict_logits(module, X, batch_size)
    loss = F.cross_entropy(logits, y, weight=weight).item()
    acc = (logits.argmax(dim=1) == y).double().mean().item()
    return loss, acc


def _train_epoch(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    X: NDArray[Any],
    y: torch.Tensor,
    weight: torch.Tensor | None,
    cfg: TrainConfig,
    generator: torch.Generator,
) -> tuple[float, float]:
    """One shuffled pass; returns the running mean loss and accuracy (dropout active)."""
    module.train()
    order = torch.randperm(len(X), generator=generator).numpy()
    loss_sum, correct = 0.0, 0
    for idx, xb in _batches(X, order, cfg.batch_size):
        yb = y[torch.from_numpy(idx)]
        logits = module(xb)
        loss = F.cross_entropy(logits, yb, weight=weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(idx)
        correct += int((logits.argmax(dim=1) == yb).sum())
    return loss_sum / len(X), correct / len(X)


def train_module(
    module: nn.Module,
    X: NDArray[Any],
    y: NDArray[np.int64],
    cfg: TrainConfig,
    class_weight: NDArray[np.float64] | None = None,
    eval_set: tuple[NDArray[Any], NDArray[np.int64]] | None = None,
) -> TrainResult:
    """Train ``module`` in place with AdamW and early stopping; restore the best epoch.

    The monitored quantity is the validation loss when ``eval_set`` is given,
    else the epoch's running training loss. Training stops after ``patience``
    epochs without a strict improvement, and the weights of the best epoch are
    loaded back. Validation loss uses the same (optionally class-weighted)
    cross-entropy as training. Shuffling draws from a local generator seeded
    with ``cfg.seed``; dropout uses torch's global generator, which the caller
    seeds (see ``_TorchHead.fit``).
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    # fused: one kernel per step instead of a Python loop over tensors, several times faster on CPU
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    weight = None if class_weight is None else torch.as_tensor(class_weight, dtype=torch.float32)
    y_t = torch.from_numpy(y)
    val = None if eval_set is None else (eval_set[0], torch.from_numpy(eval_set[1]))
    history: list[dict[str, Any]] = []
    best_loss, best_epoch, best_state = math.inf, 0, None
    for epoch in range(1, cfg.max_epochs + 1):
        train_loss, train_acc = _train_epoch(module, optimizer, X, y_t, weight, cfg, generator)
        val_loss, val_acc = (None, None) if val is None else _evaluate(module, *val, weight, cfg.batch_size)
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "val_loss": val_loss,
                "val_acc": val_acc,
            }
        )
        monitored = train_loss if val_loss is None else val_loss
        if math.isfinite(monitored) and monitored < best_loss:
            best_loss, best_epoch = monitored, epoch
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        elif epoch - best_epoch >= cfg.patience:
            break
    if best_state is None:
        raise RuntimeError("training diverged: the monitored loss was never finite; try a lower lr")
    module.load_state_dict(best_state)
    module.eval()
    return TrainResult(history=history, best_epoch=best_epoch)


# ----------------------------------------------------------------------- torch heads


class _TorchHead(ClassifierMixin, BaseEstimator, metaclass=ABCMeta):
    """Shared fit/predict/persistence for heads that are small torch modules.

    Subclasses define the module (:meth:`_build_module`), which input shapes
    are compatible with a fitted head (:meth:`_check_shape`), and validation
    of their own params.

    ``class_weight="balanced"`` weights the cross-entropy by inverse class
    frequency in the training labels; the validation loss uses the same weights.
    ``random_state`` seeds init, dropout and shuffling; reruns with the same int
    are bit-identical on CPU (for a given torch build and thread count).

    Fitted attributes: ``classes_``, ``n_features_in_`` (C), ``input_shape_``
    ``(C, H, W)``, ``module_`` (use :meth:`torch_module`), ``n_params_``
    (trainable parameters), ``history_`` (one dict per epoch: epoch,
    train_loss, train_acc, val_loss, val_acc; the val entries are None without
    ``eval_set``) and ``best_epoch_`` (1-based index into ``history_``).
    """

    # ``__init__`` lives in subclasses so scikit-learn sees each one's params.
    lr: float
    weight_decay: float
    max_epochs: int
    batch_size: int
    patience: int
    class_weight: str | None
    dropout: float
    random_state: Any

    @abstractmethod
    def _build_module(self, input_shape: tuple[int, int, int], n_classes: int) -> nn.Module: ...

    @abstractmethod
    def _check_shape(self, shape: tuple[int, ...]) -> None: ...

    def _check_params(self) -> None:
        """Raise ParamsError naming the param and its allowed values."""
        _check(_is_number(self.lr) and self.lr > 0, f"lr: got {self.lr!r}; allowed: a number > 0")
        _check(
            _is_number(self.weight_decay) and self.weight_decay >= 0,
            f"weight_decay: got {self.weight_decay!r}; allowed: a number >= 0",
        )
        _check(
            _is_number(self.dropout) and 0 <= self.dropout < 1,
            f"dropout: got {self.dropout!r}; allowed: a number in [0, 1)",
        )
        for name in ("max_epochs", "batch_size", "patience"):
            _check_int(name, getattr(self, name), 1)
        _check_class_weight(self.class_weight)

    def _validated(self, X: ArrayLike) -> NDArray[Any]:
        """Validate input for a fitted head (prediction or eval_set) as maps."""
        X = _as_maps(validate_data(self, X, reset=False, allow_nd=True, dtype=FLOAT_DTYPES))
        self._check_shape(X.shape)
        return X

    def fit(
        self, X: ArrayLike, y: ArrayLike, eval_set: tuple[ArrayLike, ArrayLike] | None = None
    ) -> "_TorchHead":
        """Train on maps ``X`` with labels ``y``; early-stop on ``eval_set=(X_val, y_val)`` if given.

        Without ``eval_set`` early stopping monitors the training loss, which
        mostly guards against wasted epochs rather than against overfitting.
        """
        self._check_params()
        X, y = validate_data(self, X, y, allow_nd=True, dtype=FLOAT_DTYPES)
        X = _as_maps(X)
        self.classes_, y_idx = _encode_labels(y)
        self.input_shape_ = tuple(int(d) for d in X.shape[1:])
        val = None
        if eval_set is not None:
            X_val, y_val = eval_set
            val = (self._validated(X_val), _encode_known(self.classes_, y_val))
        weights = self._class_weights(y_idx)
        cfg = self._train_config()
        # fork_rng keeps the caller's global torch RNG untouched while init and
        # dropout draw from a stream seeded by random_state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            module = self._build_module(self.input_shape_, len(self.classes_))
            result = train_module(module, X, y_idx, cfg, weights, val)
        self._set_module(module)
        self.history_ = result.history
        self.best_epoch_ = result.best_epoch
        return self

    def _train_config(self) -> TrainConfig:
        return TrainConfig(
            lr=float(self.lr),
            weight_decay=float(self.weight_decay),
            max_epochs=int(self.max_epochs),
            batch_size=int(self.batch_size),
            patience=int(self.patience),
            seed=_seed_from(self.random_state),
        )

    def _class_weights(self, y_idx: NDArray[np.int64]) -> NDArray[np.float64] | None:
        if self.class_weight is None:
            return None
        return compute_class_weight(self.class_weight, classes=np.arange(len(self.classes_)), y=y_idx)

    def _set_module(self, module: nn.Module) -> None:
        self.module_ = module.eval()
        self.n_params_ = sum(p.numel() for p in module.parameters() if p.requires_grad)

    def _logits(self, X: ArrayLike) -> torch.Tensor:
        check_is_fitted(self)
        return predict_logits(self.module_, self._validated(X), int(self.batch_size))

    def predict_proba(self, X: ArrayLike) -> NDArray[np.float64]:
        """Softmax of the logits, computed in float64 so rows sum to 1 tightly."""
        return softmax(self._logits(X).numpy().astype(np.float64), axis=1)

    def predict(self, X: ArrayLike) -> NDArray[Any]:
        idx = self._logits(X).argmax(dim=1).numpy()
        return self.classes_[idx]

    def torch_module(self) -> nn.Module:
        """A copy of the trained module (maps -> logits, no softmax), in eval mode.

        A copy, so fine-tuning it does not silently change this fitted head.
        """
        check_is_fitted(self)
        return copy.deepcopy(self.module_).eval()

    # ------------------------------------------------------------- persistence

    def save(self, path: str | Path) -> None:
        """Write the state dict to ``path`` (safetensors) and metadata to ``<path>.json``."""
        check_is_fitted(self)
        state = {k: v.detach().contiguous() for k, v in self.module_.state_dict().items()}
        meta = {
            "format": FORMAT_VERSION,
            "class": type(self).__name__,
            "params": _saved_params(self),
            "classes": _plain(self.classes_),
            "input_shape": list(self.input_shape_),
            "n_features_in": int(self.n_features_in_),
            "history": self.history_,
            "best_epoch": int(self.best_epoch_),
        }
        _write_pair(path, safetensors.torch.save(state), meta)

    def _restore(self, meta: Mapping[str, Any], path: Path) -> None:
        self.classes_ = np.asarray(meta["classes"])
        self.input_shape_ = tuple(int(d) for d in meta["input_shape"])
        self.n_features_in_ = int(meta["n_features_in"])
        self.history_ = list(meta["history"])
        self.best_epoch_ = int(meta["best_epoch"])
        module = self._build_module(self.input_shape_, len(self.classes_))
        module.load_state_dict(safetensors.torch.load_file(str(path)), strict=True)
        self._set_module(module)


class LinearHead(_TorchHead):
    """Flatten the maps, then ``Dense(hidden, ReLU) -> Dropout -> Dense -> softmax``.

    ``hidden=0`` gives a single linear layer (with dropout on its inputs).
    The flattened size fixes the map shape: predicting needs the same
    ``(C, H, W)`` as training.
    """

    def __init__(
        self,
        hidden: int = 256,
        dropout: float = 0.5,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        max_epochs: int = 100,
        batch_size: int = 64,
        patience: int = 10,
        class_weight: str | None = None,
        random_state: Any = None,
    ) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.patience = patience
        self.class_weight = class_weight
        self.random_state = random_state

    def _check_params(self) -> None:
        super()._check_params()
        _check_int("hidden", self.hidden, 0)

    def _build_module(self, input_shape: tuple[int, int, int], n_classes: int) -> nn.Module:
        return LinearNet(math.prod(input_shape), int(self.hidden), n_classes, float(self.dropout))

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if tuple(shape[1:]) != self.input_shape_:
            raise ValueError(
                f"X has maps of shape {tuple(shape[1:])}, but LinearHead was fitted on {self.input_shape_}"
            )


class GapHead(_TorchHead):
    """Global average pooling of the maps, then one linear softmax layer.

    Pooling makes it independent of H, W: predicting only needs the same ``C``.
    :meth:`cam` gives class activation maps from the fc weights.
    """

    def __init__(
        self,
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        max_epochs: int = 100,
        batch_size: int = 64,
        patience: int = 10,
        class_weight: str | None = None,
        random_state: Any = None,
    ) -> None:
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.patience = patience
        self.class_weight = class_weight
        self.random_state = random_state

    def _build_module(self, input_shape: tuple[int, int, int], n_classes: int) -> nn.Module:
        return GapNet(input_shape[0], n_classes, float(self.dropout))

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        # validate_data already compared C with n_features_in_; H, W may differ.
        return None

    def cam(self, X: ArrayLike) -> NDArray[np.float32]:
        """Class activation maps ``(N, K, H, W)``, K = len(classes_), batch by batch.

        ``cam(X).mean(axis=(2, 3))`` equals the logits minus the fc bias.
        """
        check_is_fitted(self)
        maps = self._validated(X)
        self.module_.eval()
        with torch.no_grad():
            batches = _batches(maps, np.arange(len(maps)), int(self.batch_size))
            parts = [self.module_.cam(xb) for _, xb in batches]
        return torch.cat(parts).numpy()


# -------------------------------------------------------------------------- SVM head


def _platt_proba(
    decision: NDArray[np.float64], platt: NDArray[np.float64], n_classes: int
) -> NDArray[np.float64]:
    """Sigmoid-calibrated probabilities, as sklearn's CalibratedClassifierCV computes them.

    One sigmoid ``1 / (1 + exp(a*d + b))`` per one-vs-rest score; binary gives
    the positive class and its complement, multiclass is normalized to sum 1.
    """
    scores = decision.reshape(len(decision), -1)
    calibrated = expit(-(platt[:, 0] * scores + platt[:, 1]))
    if n_classes == 2:
        return np.column_stack([1.0 - calibrated[:, 0], calibrated[:, 0]])
    total = calibrated.sum(axis=1, keepdims=True)
    uniform = np.full_like(calibrated, 1.0 / n_classes)
    return np.divide(calibrated, total, out=uniform, where=total != 0)


class SvmHead(ClassifierMixin, BaseEstimator):
    """``StandardScaler -> LinearSVC`` on pooled vectors ``(N, C)``.

    The pipeline feeds it pooled vectors; 4-D maps are accepted too and pooled
    here (mean over H, W), so it can read the same cache as the torch heads.

    ``C_grid``: if given, ``C`` is ignored and chosen by stratified ``cv``-fold
    cross-validation (accuracy) on the training data only; ``best_C_`` and
    ``cv_scores_`` (mean accuracy per grid value, in grid order) are recorded.
    Ties go to the earliest grid value.

    ``calibrate=True``: Platt scaling fitted by
    ``CalibratedClassifierCV(method="sigmoid", ensemble=False)`` with the same
    stratified folds: the sigmoids are fitted on out-of-fold decision values
    and the SVM itself is the one trained on all the data. Only the sigmoid
    parameters (``platt_``, one ``(a, b)`` row per one-vs-rest score) are kept,
    and ``predict_proba`` applies them with sklearn's formula; this is what lets
    the calibrated head be saved as plain arrays and loaded without refitting
    or unpickling. ``predict`` and ``decision_function`` are the SVM's whatever
    ``calibrate`` is, so ``argmax(predict_proba)`` can disagree with ``predict``
    near the boundary (as with ``SVC(probability=True)``). Without calibration
    there is no ``predict_proba`` at all (``hasattr`` is False).

    Fitted attributes: ``classes_``, ``n_features_in_`` (C), ``model_`` (the
    fitted scaler + LinearSVC pipeline, on label indices), ``best_C_``,
    ``cv_scores_`` (None without ``C_grid``), ``platt_`` (only if calibrated)
    and ``n_iter_``.
    """

    def __init__(
        self,
        C: float = 1.0,
        C_grid: Sequence[float] | None = None,
        cv: int = 5,
        class_weight: str | None = None,
        max_iter: int = 5000,
        calibrate: bool = False,
        random_state: Any = None,
    ) -> None:
        self.C = C
        self.C_grid = C_grid
        self.cv = cv
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.calibrate = calibrate
        self.random_state = random_state

    def _check_params(self) -> None:
        _check(_is_number(self.C) and self.C > 0, f"C: got {self.C!r}; allowed: a number > 0")
        grid = self.C_grid
        positive_list = isinstance(grid, (list, tuple)) and len(grid) > 0
        positive_list = positive_list and all(_is_number(c) and c > 0 for c in grid)
        _check(
            grid is None or positive_list,
            f"C_grid: got {grid!r}; allowed: null or a non-empty list of numbers > 0",
        )
        _check_int("cv", self.cv, 2)
        _check_int("max_iter", self.max_iter, 1)
        _check(
            isinstance(self.calibrate, (bool, np.bool_)),
            f"calibrate: got {self.calibrate!r}; allowed: true or false",
        )
        _check_class_weight(self.class_weight)

    def _pipeline(self, C: float, seed: int) -> Pipeline:
        svc = LinearSVC(C=C, class_weight=self.class_weight, max_iter=int(self.max_iter), random_state=seed)
        return Pipeline([("scaler", StandardScaler()), ("svc", svc)])

    def _vectors(self, X: ArrayLike, reset: bool) -> NDArray[Any]:
        return _pool(validate_data(self, X, reset=reset, allow_nd=True, dtype=FLOAT_DTYPES))

    def fit(self, X: ArrayLike, y: ArrayLike) -> "SvmHead":
        self._check_params()
        X, y = validate_data(self, X, y, allow_nd=True, dtype=FLOAT_DTYPES)
        X = _pool(X)
        self.classes_, y_idx = _encode_labels(y)
        seed = _seed_from(self.random_state)
        folds = StratifiedKFold(n_splits=int(self.cv), shuffle=True, random_state=seed)
        self.best_C_, self.cv_scores_ = self._choose_C(X, y_idx, folds, seed)
        pipeline = self._pipeline(self.best_C_, seed)
        if self.calibrate:
            calibrated = CalibratedClassifierCV(pipeline, method="sigmoid", cv=folds, ensemble=False)
            (pair,) = calibrated.fit(X, y_idx).calibrated_classifiers_
            self.model_ = pair.estimator
            self.platt_ = np.array([[c.a_, c.b_] for c in pair.calibrators], dtype=np.float64)
        else:
            self.model_ = pipeline.fit(X, y_idx)
        self.n_iter_ = int(self.model_["svc"].n_iter_)
        return self

    def _choose_C(
        self, X: NDArray[Any], y_idx: NDArray[np.int64], folds: StratifiedKFold, seed: int
    ) -> tuple[float, NDArray[np.float64] | None]:
        if self.C_grid is None:
            return float(self.C), None
        grid = [float(c) for c in self.C_grid]
        scores = [cross_val_score(self._pipeline(c, seed), X, y_idx, cv=folds).mean() for c in grid]
        return grid[int(np.argmax(scores))], np.asarray(scores)

    def decision_function(self, X: ArrayLike) -> NDArray[np.float64]:
        check_is_fitted(self)
        return self.model_.decision_function(self._vectors(X, reset=False))

    def predict(self, X: ArrayLike) -> NDArray[Any]:
        decision = self.decision_function(X)
        idx = (decision > 0).astype(np.int64) if decision.ndim == 1 else decision.argmax(axis=1)
        return self.classes_[idx]

    def _has_proba(self) -> bool:
        return bool(self.calibrate)

    @available_if(_has_proba)
    def predict_proba(self, X: ArrayLike) -> NDArray[np.float64]:
        """Platt-calibrated probabilities; only exists when ``calibrate=True``."""
        check_is_fitted(self, "platt_")
        return _platt_proba(self.decision_function(X), self.platt_, len(self.classes_))

    # ------------------------------------------------------------- persistence

    def save(self, path: str | Path) -> None:
        """Write scaler/SVM/sigmoid arrays to ``path`` (safetensors) and metadata to ``<path>.json``."""
        check_is_fitted(self)
        scaler, svc = self.model_["scaler"], self.model_["svc"]
        arrays = {
            "scaler.mean": scaler.mean_,
            "scaler.scale": scaler.scale_,
            "svc.coef": svc.coef_,
            "svc.intercept": svc.intercept_,
        }
        if hasattr(self, "platt_"):
            arrays["platt"] = self.platt_
        arrays = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()}
        meta = {
            "format": FORMAT_VERSION,
            "class": type(self).__name__,
            "params": _saved_params(self),
            "classes": _plain(self.classes_),
            "n_features_in": int(self.n_features_in_),
            "best_C": float(self.best_C_),
            "n_iter": self.n_iter_,
            "cv_scores": None if self.cv_scores_ is None else _plain(self.cv_scores_),
        }
        _write_pair(path, safetensors.numpy.save(arrays), meta)

    def _restore(self, meta: Mapping[str, Any], path: Path) -> None:
        arrays = safetensors.numpy.load_file(str(path))
        self.classes_ = np.asarray(meta["classes"])
        self.n_features_in_ = int(meta["n_features_in"])
        self.best_C_ = float(meta["best_C"])
        self.n_iter_ = int(meta["n_iter"])
        scores = meta["cv_scores"]
        self.cv_scores_ = None if scores is None else np.asarray(scores, dtype=np.float64)
        self.model_ = self._pipeline(self.best_C_, _seed_from(self.random_state))
        # Setting fitted attributes directly rebuilds the exact fitted pipeline
        # from plain arrays, which is what avoids pickle.
        scaler, svc = self.model_["scaler"], self.model_["svc"]
        scaler.mean_, scaler.scale_ = arrays["scaler.mean"], arrays["scaler.scale"]
        scaler.var_ = scaler.scale_**2
        svc.coef_, svc.intercept_ = arrays["svc.coef"], arrays["svc.intercept"]
        svc.classes_ = np.arange(len(self.classes_))
        scaler.n_features_in_ = svc.n_features_in_ = self.n_features_in_
        if "platt" in arrays:
            self.platt_ = arrays["platt"]


# ------------------------------------------------------------------ factory / load

HEADS: Mapping[str, type[BaseEstimator]] = MappingProxyType(
    {"linear": LinearHead, "gap": GapHead, "svm": SvmHead}
)
_BY_CLASS_NAME: Mapping[str, type[BaseEstimator]] = MappingProxyType(
    {cls.__name__: cls for cls in HEADS.values()}
)


def _construct(cls: type[BaseEstimator], params: Mapping[str, Any], what: str) -> Any:
    allowed = list(cls().get_params(deep=False))
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ParamsError(
            f"{what}: unknown param(s) {', '.join(map(str, unknown))}; allowed: {', '.join(allowed)}"
        )
    return cls(**params)


def make_head(kind: str, params: Mapping[str, Any] | None = None) -> Any:
    """Build an unfitted head of ``kind`` ("linear", "gap" or "svm"), checking its params now.

    Raises ParamsError (a ValueError) for an unknown kind, an unknown param or
    a value out of range, naming what is allowed.
    """
    if kind not in HEADS:
        raise ParamsError(f"unknown head kind {kind!r}; allowed: {', '.join(HEADS)}")
    head = _construct(HEADS[kind], dict(params or {}), f"head {kind!r}")
    head._check_params()
    return head


def load_head(path: str | Path) -> Any:
    """Load a head written by ``save(path)``: reads ``path`` and ``<path>.json``."""
    path = Path(path)
    meta = json.loads(_sidecar(path).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported head format {meta.get('format')!r}; expected {FORMAT_VERSION}")
    if meta.get("class") not in _BY_CLASS_NAME:
        raise ValueError(
            f"{path}: unknown head class {meta.get('class')!r}; allowed: {', '.join(_BY_CLASS_NAME)}"
        )
    digest = sha256_file(path)
    if digest != meta.get("sha256"):
        raise ValueError(
            f"{path}: checksum {digest} does not match its sidecar ({meta.get('sha256')}); "
            "the pair is inconsistent"
        )
    head = _construct(_BY_CLASS_NAME[meta["class"]], meta["params"], str(path))
    head._restore(meta, path)
    return head
