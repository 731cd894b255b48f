"""The torch modules of the torch heads, and how they train on cached arrays.

:func:`train_module` is the one training loop (:mod:`transferlab.loop`) fed
with shuffled batches of an in-memory (or memory-mapped) array: AdamW, early
stopping on the validation loss (the training loss without a validation set),
best epoch restored. Batches are cast to float32 one at a time, so a float16
cache is never expanded as a whole.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor, nn

from transferlab.loop import Loop, Monitor, best_state, run

__all__ = ["GapNet", "LinearNet", "TrainConfig", "TrainResult", "batches", "predict_logits", "train_module"]


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


# ------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    lr: float
    weight_decay: float
    max_epochs: int
    batch_size: int
    patience: int
    seed: int
    min_delta: float = 0.0


@dataclass(frozen=True)
class TrainResult:
    history: list[dict[str, Any]]
    best_epoch: int


FUSED_DEVICES = ("cpu", "cuda")  # where torch has a fused AdamW kernel


def batches(
    X: NDArray[Any], order: NDArray[np.int64], batch_size: int
) -> Iterator[tuple[NDArray[np.int64], torch.Tensor]]:
    """Yield (indices, float32 tensor) per batch; the cast happens per batch to save memory."""
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield idx, torch.from_numpy(np.ascontiguousarray(X[idx], dtype=np.float32))


def _labelled(X: NDArray[Any], y: Tensor, order: NDArray[np.int64], batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    for idx, xb in batches(X, order, batch_size):
        yield xb, y[torch.from_numpy(idx)]


def predict_logits(module: nn.Module, X: NDArray[Any], batch_size: int) -> torch.Tensor:
    """Eval-mode logits of ``module`` on maps ``X``, computed batch by batch."""
    module.eval()
    with torch.no_grad():
        order = np.arange(len(X))
        return torch.cat([module(xb) for _, xb in batches(X, order, batch_size)])


def train_module(
    module: nn.Module,
    X: NDArray[Any],
    y: NDArray[np.int64],
    cfg: TrainConfig,
    class_weight: NDArray[np.float64] | None = None,
    eval_set: tuple[NDArray[Any], NDArray[np.int64]] | None = None,
    device: torch.device | None = None,
) -> TrainResult:
    """Train ``module`` in place with AdamW and early stopping; restore the best epoch.

    With ``device`` the module trains there (batches move there one at a time)
    and comes back to the host, best weights loaded, when training ends.

    The monitored quantity is the validation loss when ``eval_set`` is given,
    else the epoch's running training loss. Training stops after ``patience``
    epochs without an improvement by more than ``cfg.min_delta``, and the weights of the best epoch are
    loaded back. Validation loss uses the same (optionally class-weighted)
    cross-entropy as training. Shuffling draws from a local generator seeded
    with ``cfg.seed``; dropout uses torch's global generator, which the caller
    seeds (see ``_TorchHead.fit``).
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(device or "cpu")
    module.to(device)
    # fused: one kernel per step instead of a Python loop over tensors, several times faster on CPU
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type in FUSED_DEVICES)
    weight = None if class_weight is None else torch.as_tensor(class_weight, dtype=torch.float32, device=device)
    y_t = torch.from_numpy(y)

    def loss_fn(logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits, labels, weight=weight)

    def train_batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        return _labelled(X, y_t, torch.randperm(len(X), generator=generator).numpy(), cfg.batch_size)

    val_batches = None
    if eval_set is not None:
        X_val, y_val = eval_set[0], torch.from_numpy(eval_set[1])
        val_batches = lambda: _labelled(X_val, y_val, np.arange(len(X_val)), cfg.batch_size)  # noqa: E731
    monitor = Monitor("train_loss" if eval_set is None else "val_loss", min_delta=cfg.min_delta)
    state = run(Loop(module, optimizer, loss_fn, train_batches, val_batches, monitor, cfg.max_epochs, cfg.patience,
                     device=device))
    best = best_state(state)
    if best is None:
        raise RuntimeError("training diverged: the monitored loss was never finite; try a lower lr")
    module.load_state_dict(best)
    module.to("cpu").eval()
    return TrainResult(history=state.history, best_epoch=state.best_epoch)
