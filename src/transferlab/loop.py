"""The one training loop: epochs of batches, validation, early stopping and the best state.

Both trainers run it: the torch heads on cached features
(``models/heads/torch_heads.py``) and fine-tuning on images
(``training/finetune.py``). What differs between them is passed in: the
batches, the loss, an optional per-batch LR scheduler and AMP grad scaler,
how the model enters train mode, figures to record before an epoch, and a
per-epoch hook (finetune writes its checkpoint there, so a killed run resumes
exactly).

Early stopping: after every epoch the monitored figure of its record
(``val_loss``, ``val_acc``, ``train_loss``...) is compared with the best so
far; only a finite value better by more than the monitor's ``min_delta`` is an
improvement (so a diverged epoch never is, nor one that gains a rounding
error), and it copies the model's state as the best state. Training
stops after ``max_epochs`` epochs or ``patience`` epochs in a row without an
improvement. The caller loads the best state back (:func:`best_state`).

It lives at the top of the package, beside ``io`` and ``config``, because
``models/`` must not import ``training/`` (tests/test_architecture.py).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "Loop", "LoopState", "Monitor", "best_state", "copy_state", "evaluate", "finished", "fresh_state", "run", "run_epoch",
    "train_epoch",
]

StateDict = dict[str, Tensor]
Batches = Iterable[tuple[Tensor, Tensor]]
EpochHook = Callable[[dict[str, Any], "LoopState"], None]


@dataclass(frozen=True)
class Monitor:
    """The record key early stopping watches, whether larger is better, and the least gain that counts.

    ``min_delta`` (Keras' and Lightning's name) is in the figure's own units. A
    loss that creeps down by 1e-5 an epoch after the val split is already all
    right would otherwise keep an easy problem training to ``max_epochs``.
    """

    key: str
    maximize: bool = False
    min_delta: float = 0.0

    def initial(self) -> float:
        return -math.inf if self.maximize else math.inf

    def improves(self, value: float | None, best: float) -> bool:
        if value is None or not math.isfinite(value):
            return False
        return value > best + self.min_delta if self.maximize else value < best - self.min_delta


@dataclass
class LoopState:
    """Early-stopping state and history: with the model/optimiser/RNG states, all a resumed run needs."""

    best_metric: float
    best_state: StateDict | None = None
    epoch: int = 0  # last finished epoch
    best_epoch: int = 0  # 0: no improvement yet
    bad_epochs: int = 0  # epochs in a row without an improvement
    history: list[dict[str, Any]] = field(default_factory=list)


def copy_state(module: nn.Module) -> StateDict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def fresh_state(monitor: Monitor, model: nn.Module | None = None) -> LoopState:
    """A state before the first epoch; with ``model``, its current weights stand as the best state."""
    return LoopState(best_metric=monitor.initial(), best_state=None if model is None else copy_state(model))


def _to(x: Tensor, device: torch.device | None) -> Tensor:
    return x if device is None else x.to(device, non_blocking=True)


@dataclass
class Loop:
    """One model's training: what :func:`run` needs besides the state."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    train_batches: Callable[[int], Batches]  # epoch (1-based) -> its shuffled (inputs, labels) batches
    val_batches: Callable[[], Batches] | None  # None: no validation (val figures are None)
    monitor: Monitor
    max_epochs: int
    patience: int
    scheduler: Any = None  # stepped after every batch
    scaler: torch.amp.GradScaler | None = None
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    device: torch.device | None = None  # batches are moved there
    train_mode: Callable[[], Any] | None = None  # default: model.train()
    before_epoch: Callable[[], dict[str, Any]] | None = None  # figures recorded before training (e.g. lr)
    timed: bool = False  # record each epoch's wall seconds
    # how an input batch moves to ``device`` (e.g. device.images_to: channels_last for conv nets)
    inputs_to: Callable[[Tensor, torch.device | None], Tensor] = _to
    # Data-parallel training (transferlab.distributed): ``net`` is what the train step calls (the
    # DistributedDataParallel wrapper of ``model``; None: ``model``); ``ranks`` sums the train figures over
    # the ranks, gathers the sharded val logits back in order (``interleave``) and has every rank take
    # rank 0's epoch record (``broadcast``), so early stopping is decided once. None: one process.
    net: nn.Module | None = None
    ranks: Any = None


def train_epoch(loop: Loop, batches: Batches) -> tuple[float, float]:
    """One pass over ``batches``; returns the running mean loss and accuracy (dropout active)."""
    model, optimizer, scaler = loop.net or loop.model, loop.optimizer, loop.scaler
    loss_sum, correct, seen = 0.0, 0, 0
    for xb, yb in batches:
        xb, yb = loop.inputs_to(xb, loop.device), _to(yb, loop.device)
        with loop.autocast():
            logits = model(xb)
            loss = loop.loss_fn(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        if loop.scheduler is not None:
            loop.scheduler.step()
        loss_sum += loss.item() * len(yb)
        correct += int((logits.argmax(dim=1) == yb).sum())
        seen += len(yb)
    if loop.ranks is not None:
        loss_sum, correct, seen = loop.ranks.sum([loss_sum, correct, seen])
    return loss_sum / seen, correct / seen


def evaluate(
    model: nn.Module,
    batches: Batches,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    device: torch.device | None = None,
    inputs_to: Callable[[Tensor, torch.device | None], Tensor] = _to,
    gather: Callable[[Tensor], Tensor] | None = None,
) -> tuple[float, float]:
    """Loss and accuracy over all of ``batches`` at once, in eval mode.

    ``gather``: rows of every rank's shard, back in the items' order (the loss
    is then computed over the whole split, as one process computes it).
    """
    model.eval()
    logits, labels = [], []
    with torch.inference_mode(), autocast():
        for xb, yb in batches:
            logits.append(model(inputs_to(xb, device)).float())
            labels.append(_to(yb, device))
    all_logits, all_labels = torch.cat(logits), torch.cat(labels)
    if gather is not None:
        all_logits, all_labels = gather(all_logits), gather(all_labels)
    loss = float(loss_fn(all_logits, all_labels))
    return loss, float((all_logits.argmax(dim=1) == all_labels).double().mean())


def finished(loop: Loop, state: LoopState) -> bool:
    return state.epoch >= loop.max_epochs or state.bad_epochs >= loop.patience


def _update(loop: Loop, state: LoopState, record: dict[str, Any]) -> None:
    value = record[loop.monitor.key]
    if loop.monitor.improves(value, state.best_metric):
        state.best_metric, state.best_epoch, state.bad_epochs = float(value), record["epoch"], 0
        state.best_state = copy_state(loop.model)
    else:
        state.bad_epochs += 1


def run_epoch(loop: Loop, state: LoopState) -> dict[str, Any]:
    """Train and validate one epoch; append its record to the history and update the best state."""
    epoch = state.epoch + 1
    started = time.perf_counter()
    (loop.train_mode or loop.model.train)()
    before = loop.before_epoch() if loop.before_epoch is not None else {}
    train_loss, train_acc = train_epoch(loop, loop.train_batches(epoch))
    val_loss, val_acc = (None, None)
    if loop.val_batches is not None:
        val_loss, val_acc = evaluate(loop.model, loop.val_batches(), loop.loss_fn, loop.autocast, loop.device,
                                     loop.inputs_to, None if loop.ranks is None else loop.ranks.interleave)
    record = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
              "val_acc": val_acc, **before}
    if loop.timed:
        record["seconds"] = round(time.perf_counter() - started, 3)
    if loop.ranks is not None:
        record = loop.ranks.broadcast(record)  # rank 0's figures decide, identically on every rank
    state.history.append(record)
    state.epoch = epoch
    _update(loop, state, record)
    return record


def run(loop: Loop, state: LoopState | None = None, on_epoch_end: EpochHook | None = None) -> LoopState:
    """Run epochs from ``state`` (fresh if None) until finished; ``on_epoch_end(record, state)`` after each."""
    state = fresh_state(loop.monitor) if state is None else state
    while not finished(loop, state):
        record = run_epoch(loop, state)
        if on_epoch_end is not None:
            on_epoch_end(record, state)
    return state


def best_state(state: LoopState) -> StateDict | None:
    """The best epoch's weights, or None when the monitored figure was never finite (training diverged)."""
    return state.best_state if state.best_epoch > 0 else None
