"""The torch heads: scikit-learn estimators around small torch modules, trained on cached maps.

* :class:`LinearHead` -- flatten the maps ``(N, C, H, W)``, then a small MLP
  (``Dense(hidden, ReLU) -> Dropout -> Dense``) with softmax outputs.
* :class:`GapHead` -- global average pooling ``(N, C, H, W) -> (N, C)`` and one
  linear softmax layer; exposes class activation maps through :meth:`GapHead.cam`.

Input conventions are those of :mod:`transferlab.models.heads.common`;
computation is float32 (batches are cast one at a time, so a float16 cache is
never expanded to float32 as a whole). The full map shape is kept in
``input_shape_``. Training is :func:`~transferlab.models.heads.nets.train_module` (AdamW, shuffled
batches, early stopping on the validation loss, best epoch restored). Default
params are those of ``train_head.<name>`` in params.yaml (the params models in
:mod:`transferlab.config`).
"""

from __future__ import annotations

import copy
import math
from abc import ABCMeta, abstractmethod
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import safetensors.torch
import torch
from numpy.typing import ArrayLike, NDArray
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import Tensor, nn

from transferlab.config import GapHeadParams, LinearHeadParams
from transferlab.models.heads.common import (
    FLOAT_DTYPES, as_maps, check, check_class_weight, check_int, encode_known, encode_labels, is_number, pool,
    seed_from,
)
from transferlab.models.heads.nets import GapNet, LinearNet, TrainConfig, batches, predict_logits, train_module
from transferlab.models.heads.persistence import head_meta, write_pair

__all__ = ["GapHead", "LinearHead", "linear_from_gap"]

_LINEAR, _GAP = LinearHeadParams(), GapHeadParams()  # the estimators' defaults


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
    ``device`` (a torch device string, ``compute.device`` resolved) is where
    training runs; the fitted module then lives on the host, where it is saved,
    copied for a warm start and used to predict on cached features. Being where
    it ran, not what was learned, ``device`` is not saved with the head.

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
    min_delta: float
    class_weight: str | None
    dropout: float
    random_state: Any
    device: str

    @abstractmethod
    def _build_module(self, input_shape: tuple[int, int, int], n_classes: int) -> nn.Module: ...

    @abstractmethod
    def _check_shape(self, shape: tuple[int, ...]) -> None: ...

    def _training_input(self, X: NDArray[Any]) -> NDArray[Any]:
        """What the module trains on, from validated maps: the maps themselves unless a head can do with less."""
        return X

    def _check_params(self) -> None:
        """Raise ParamsError naming the param and its allowed values."""
        check(is_number(self.lr) and self.lr > 0, f"lr: got {self.lr!r}; allowed: a number > 0")
        check(
            is_number(self.weight_decay) and self.weight_decay >= 0,
            f"weight_decay: got {self.weight_decay!r}; allowed: a number >= 0",
        )
        check(
            is_number(self.dropout) and 0 <= self.dropout < 1,
            f"dropout: got {self.dropout!r}; allowed: a number in [0, 1)",
        )
        check(
            is_number(self.min_delta) and self.min_delta >= 0,
            f"min_delta: got {self.min_delta!r}; allowed: a number >= 0",
        )
        for name in ("max_epochs", "batch_size", "patience"):
            check_int(name, getattr(self, name), 1)
        check_class_weight(self.class_weight)

    def _validated(self, X: ArrayLike) -> NDArray[Any]:
        """Validate input for a fitted head (prediction or eval_set) as maps."""
        X = as_maps(validate_data(self, X, reset=False, allow_nd=True, dtype=FLOAT_DTYPES))
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
        X = as_maps(X)
        self.classes_, y_idx = encode_labels(y)
        self.input_shape_ = tuple(int(d) for d in X.shape[1:])
        X = self._training_input(X)
        val = None
        if eval_set is not None:
            X_val, y_val = eval_set
            val = (self._training_input(self._validated(X_val)), encode_known(self.classes_, y_val))
        weights = self._class_weights(y_idx)
        cfg = self._train_config()
        # fork_rng keeps the caller's global torch RNG untouched while init and
        # dropout draw from a stream seeded by random_state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            module = self._build_module(self.input_shape_, len(self.classes_))
            result = train_module(module, X, y_idx, cfg, weights, val, device=torch.device(self.device))
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
            seed=seed_from(self.random_state),
            min_delta=float(self.min_delta),
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
        meta = head_meta(self, input_shape=list(self.input_shape_), n_features_in=int(self.n_features_in_),
                         history=self.history_, best_epoch=int(self.best_epoch_))
        write_pair(path, safetensors.torch.save(state), meta)

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
        hidden: int = _LINEAR.hidden,
        dropout: float = _LINEAR.dropout,
        lr: float = _LINEAR.lr,
        weight_decay: float = _LINEAR.weight_decay,
        max_epochs: int = _LINEAR.max_epochs,
        batch_size: int = _LINEAR.batch_size,
        patience: int = _LINEAR.patience,
        min_delta: float = _LINEAR.min_delta,
        class_weight: str | None = _LINEAR.class_weight,
        random_state: Any = _LINEAR.random_state,
        device: str = "cpu",
    ) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.patience = patience
        self.min_delta = min_delta
        self.class_weight = class_weight
        self.random_state = random_state
        self.device = device

    def _check_params(self) -> None:
        super()._check_params()
        check_int("hidden", self.hidden, 0)

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
    It fits on maps ``(N, C, H, W)`` or on pooled vectors ``(N, C)`` alike (the
    pipeline gives it the pooled vectors extract caches); maps are pooled once
    before training. :meth:`cam` gives class activation maps from the fc weights.
    """

    def __init__(
        self,
        dropout: float = _GAP.dropout,
        lr: float = _GAP.lr,
        weight_decay: float = _GAP.weight_decay,
        max_epochs: int = _GAP.max_epochs,
        batch_size: int = _GAP.batch_size,
        patience: int = _GAP.patience,
        min_delta: float = _GAP.min_delta,
        class_weight: str | None = _GAP.class_weight,
        random_state: Any = _GAP.random_state,
        device: str = "cpu",
    ) -> None:
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.patience = patience
        self.min_delta = min_delta
        self.class_weight = class_weight
        self.random_state = random_state
        self.device = device

    def _build_module(self, input_shape: tuple[int, int, int], n_classes: int) -> nn.Module:
        return GapNet(input_shape[0], n_classes, float(self.dropout))

    def _training_input(self, X: NDArray[Any]) -> NDArray[Any]:
        # Pool once, before the epochs: (N, C, H, W) -> (N, C, 1, 1). The net's own pooling of a 1 x 1 map
        # is the identity, so every epoch costs the same whatever H x W the backbone's maps have.
        return X if X.shape[2:] == (1, 1) else as_maps(pool(X).astype(np.float32))

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
            parts = [self.module_.cam(xb) for _, xb in batches(maps, np.arange(len(maps)), int(self.batch_size))]
        return torch.cat(parts).numpy()


def linear_from_gap(head: GapHead) -> tuple[Tensor, Tensor]:
    """The gap spec's warm start: a fitted GapHead's fc weight and bias (its logits on pooled features)."""
    fc = head.torch_module().fc
    return fc.weight.detach().clone(), fc.bias.detach().clone()
