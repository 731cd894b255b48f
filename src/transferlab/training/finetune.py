"""Fine-tune an ImageNet-pretrained backbone end to end with a new classifier head: the job.

The network is the pretrained backbone with its ImageNet classifier swapped
for ``Dropout(p) -> Linear(num_features, K)`` on globally pooled features
(``Backbone.replace_classifier``). Everything architecture-specific -- block
names, where the classifier sits, BatchNorm handling -- goes through the
:class:`~transferlab.models.backbones.Backbone` adapter.

The parts, one module each:

* :mod:`~transferlab.training.images` -- the train/val images of split.csv, augmentation.
* :mod:`~transferlab.training.strategy` -- freezing strategy, optimiser groups
  (discriminative lrs, no decay on norms and biases), warmup + cosine schedule.
* :mod:`~transferlab.training.warm_start` -- ``finetune.init: best_head``: the
  best cached-feature head whose registry spec can warm-start (by val accuracy).
* :mod:`transferlab.loop` -- the training loop, shared with the torch heads:
  early stopping on the val split (``monitor``, ``patience``); the weights of
  the best epoch are what is written.
* :mod:`~transferlab.training.checkpoint` -- ``checkpoint.pt`` after every
  epoch: a rerun with the same settings resumes after the last finished epoch
  and ends bit-identical to an uninterrupted run on CPU.

Outputs (``out_dir``): ``model.safetensors`` (state dict of the whole network,
best epoch), ``model.json`` (what :func:`load_finetuned` needs to rebuild
it), ``metrics.json`` (train/val figures only: test is the evaluate stage's),
``curve.csv`` and ``checkpoint.pt``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd
import safetensors.torch
import torch
from torch import nn
from tqdm import tqdm

from transferlab.config import FinetuneParams
from transferlab.device import images_to, resolve_device
from transferlab.distributed.ranks import SINGLE, Ranks
from transferlab.io import atomic_path, atomic_write_json, sha256_file
from transferlab.loop import Loop, LoopState, Monitor, finished, fresh_state, run
from transferlab.models.backbones import NO_WEIGHTS, Backbone, load_backbone
from transferlab.models.heads.svm import linear_from_svm
from transferlab.models.heads.torch_heads import linear_from_gap
from transferlab.training import checkpoint
from transferlab.models.finetuned import FORMAT_VERSION, META_FILE, MODEL_FILE, load_finetuned  # noqa: F401
from transferlab.training.images import FinetuneError, ImageDataset, SplitData, read_split, train_transform
from transferlab.training.strategy import (
    Session, WarmupCosine, apply_strategy, build_model, class_weights, head_lr, head_spec, make_optimizer,
    make_scheduler, make_session, new_head, param_groups, trainable_blocks, trained_blocks,
)
from transferlab.training.warm_start import WarmStart, choose_warm_start

__all__ = [
    "CHECKPOINT_FILE", "CURVE_COLUMNS", "CURVE_FILE", "FinetuneError", "FinetuneJob", "FinetuneResult",
    "ImageDataset", "META_FILE", "METRICS_FILE", "MODEL_FILE", "SplitData", "WarmStart", "WarmupCosine",
    "apply_strategy", "build_model", "choose_warm_start", "class_weights", "curve_frame", "finetune",
    "linear_from_gap", "linear_from_svm", "load_finetuned", "make_optimizer", "make_scheduler", "new_head",
    "param_groups", "read_split", "train_transform", "trainable_blocks", "write_outputs",
]

METRICS_FILE = "metrics.json"
CURVE_FILE = "curve.csv"
CHECKPOINT_FILE = "checkpoint.pt"
CURVE_COLUMNS = ("step", "train_loss", "train_acc", "val_loss", "val_acc", "lr")
# (history key, larger is better) for each finetune.monitor value
MONITORS: Mapping[str, Monitor] = MappingProxyType(
    {"val_loss": Monitor("val_loss", maximize=False), "val_accuracy": Monitor("val_acc", maximize=True)}
)

Echo = Callable[[str], None]
EpochHook = Callable[[dict[str, Any]], None]


def _say(message: str) -> None:
    print(message, flush=True)


def _quiet(message: str) -> None:
    """The echo of ranks other than 0: rank 0 says it once."""


@dataclass(frozen=True)
class FinetuneJob:
    """What to fine-tune, on which data, and where the outputs go."""

    backbone: str
    params: FinetuneParams
    split_csv: Path
    images_root: Path
    out_dir: Path
    weights: str | None = None  # as in extract.weights (NO_WEIGHTS: random init)
    weights_path: str | None = None  # as in extract.weights_path
    heads_dir: Path | None = None  # models/heads/<backbone>: read only when params.init is best_head
    head_kinds: Sequence[str] | None = None  # train_head.kinds: the heads a warm start may use (None: all)
    device: str = "cpu"  # compute.device: auto | cpu | cuda | cuda:N | mps
    # strategy auto: {requested, chosen, reason} from transferlab.probe.choice.resolve; ``params`` holds
    # the chosen strategy (what trains, and what the checkpoint identity records)
    choice: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class FinetuneResult:
    model: nn.Module  # best epoch's weights, eval mode
    backbone: Backbone
    meta: dict[str, Any]  # model.json
    metrics: dict[str, Any]  # metrics.json
    history: list[dict[str, Any]]
    notes: list[str]
    resumed_from: int | None  # last finished epoch found in the checkpoint, if training resumed


def _prepare(job: FinetuneJob, note: Echo, ranks: Ranks) -> tuple[Backbone, nn.Module, SplitData, WarmStart | None]:
    data = read_split(job.split_csv, job.images_root)
    params = job.params
    # Seeding before the backbone is built makes random-init backbones (weights: none) reproducible too.
    torch.manual_seed(params.seed)
    backbone = load_backbone(job.backbone, job.weights, job.weights_path)
    warm = None
    if params.init == "best_head":
        if job.heads_dir is None:
            raise FinetuneError("finetune.init is best_head, but no heads directory was given")
        # Loading a head builds torch modules; fork_rng keeps the seeded stream the same as with init: new.
        with torch.random.fork_rng(devices=[]):
            warm = choose_warm_start(job.heads_dir, data.classes, backbone.num_features, note, job.head_kinds)
    model = build_model(backbone, len(data.classes), params, warm)
    if ranks.rank > 0:  # every rank built the same network; each draws its own augmentations and dropout
        torch.manual_seed(int(np.random.SeedSequence([params.seed, ranks.rank]).generate_state(1)[0]))
    return backbone, model, data, warm


def _loop(session: Session, params: FinetuneParams) -> Loop:
    """The shared training loop, fed with this session's loaders, AMP scaler and per-batch schedule."""
    name, max_epochs = session.name, params.max_epochs

    def train_batches(epoch: int) -> Any:
        session.sampler.set_epoch(epoch)  # this epoch's permutation, the same on every rank
        desc = f"finetune {name} epoch {epoch}/{max_epochs}"
        return tqdm(session.train_loader, desc=desc, unit="batch", leave=False, disable=not session.ranks.is_main)

    def val_batches() -> Any:
        return tqdm(session.val_loader, desc=f"finetune {name} val", unit="batch", leave=False,
                    disable=not session.ranks.is_main)

    return Loop(
        session.model, session.optimizer, session.loss_fn, train_batches, val_batches, MONITORS[params.monitor],
        max_epochs, params.patience, scheduler=session.scheduler, scaler=session.scaler,
        autocast=session.autocast, device=session.device, train_mode=lambda: session.backbone.train(True),
        before_epoch=lambda: {"lr": head_lr(session.optimizer)}, timed=True, inputs_to=images_to,
        net=session.net, ranks=session.ranks if session.ranks.distributed else None,
    )


def finetune(job: FinetuneJob, echo: Echo = _say, on_epoch_end: EpochHook | None = None,
             ranks: Ranks = SINGLE) -> FinetuneResult:
    """Fine-tune ``job.backbone``, resuming from ``out_dir/checkpoint.pt`` when it matches; write outputs.

    ``echo`` receives progress and notes (resume, warm start, skipped heads);
    ``on_epoch_end`` is called with each finished epoch's record after its
    checkpoint is written. With several ``ranks`` (DistributedDataParallel,
    :func:`~transferlab.training.strategy.make_session`) every rank trains and
    only rank 0 reads and writes the checkpoint and writes the outputs and notes.
    """
    notes: list[str] = []
    if not ranks.is_main:
        echo = _quiet

    def note(message: str) -> None:
        notes.append(message)
        echo(message)

    params = job.params
    backbone, model, data, warm = _prepare(job, note, ranks)
    ident = checkpoint.identity(job, backbone, data, warm, world=ranks.world)
    session = make_session(backbone, model, data, params, ranks.device(resolve_device(job.device)), ranks)
    loop = _loop(session, params)
    path = job.out_dir / CHECKPOINT_FILE
    state, resumed_from = _start(session, loop, ident, path, note)

    def epoch_end(record: dict[str, Any], state: LoopState) -> None:
        rngs = ranks.gather(torch.get_rng_state())  # every rank's augmentation stream, for an exact resume
        if ranks.is_main:
            checkpoint.save(path, checkpoint.checkpoint(session, state, ident, rngs))
        echo(_epoch_line(job.backbone, record, params.max_epochs, state.best_epoch == record["epoch"]))
        if on_epoch_end is not None:
            on_epoch_end(record)

    state = run(loop, state, epoch_end)
    if state.best_epoch == 0 or state.best_state is None:
        raise FinetuneError(f"training diverged: {params.monitor} was never finite; try a lower finetune.lr")
    session.model.load_state_dict(state.best_state)
    session.model.eval()
    meta = _meta(job, backbone, data, warm, state, session)
    result = FinetuneResult(session.model, backbone, meta, _metrics(backbone, state), state.history, notes,
                            resumed_from)
    if ranks.is_main:
        write_outputs(result, job.out_dir)
    return result


def _start(
    session: Session, loop: Loop, ident: dict[str, Any], path: Path, note: Echo
) -> tuple[LoopState, int | None]:
    """Loop state restored from a matching checkpoint, or fresh; says which."""
    name, max_epochs = ident["backbone"], loop.max_epochs
    # rank 0 reads it (the other nodes need no copy of the output folder) and every rank resumes from it
    data = session.ranks.broadcast(checkpoint.read(path, note) if session.ranks.is_main else None)
    if data is not None and data["params"] == ident:
        state = checkpoint.restore(session, data)
        if finished(loop, state):
            why = "early stopping" if state.bad_epochs >= loop.patience else "max_epochs"
            note(f"finetune@{name}: checkpoint says training finished ({why} after epoch {state.epoch} of "
                 f"{max_epochs}); writing outputs without training")
        else:
            note(f"resuming finetune@{name} from checkpoint: epoch {state.epoch} of {max_epochs} finished")
        return state, state.epoch
    if data is not None:
        changed = "; ".join(checkpoint.differences(data["params"], ident)[:5])
        note(f"finetune@{name}: the checkpoint was made with different settings ({changed}); starting fresh")
    # The initial weights stand as the best state until an epoch improves (the checkpoint always has one).
    return fresh_state(loop.monitor, session.model), None


def _epoch_line(name: str, record: dict[str, Any], max_epochs: int, best: bool) -> str:
    return (f"finetune@{name} epoch {record['epoch']}/{max_epochs}: train loss {record['train_loss']:.4f} "
            f"acc {record['train_acc']:.3f} | val loss {record['val_loss']:.4f} acc {record['val_acc']:.3f} | "
            f"lr {record['lr']:.2e} | {record['seconds']:.1f}s{' *' if best else ''}")


# --------------------------------------------------------------------------- outputs


def _meta(job: FinetuneJob, backbone: Backbone, data: SplitData, warm: WarmStart | None,
          state: LoopState, session: Session) -> dict[str, Any]:
    params = job.params
    return {
        "format": FORMAT_VERSION,
        "backbone": backbone.name,
        "weights": backbone.weights_id,
        "classes": data.classes,
        "head": head_spec(backbone.num_features, len(data.classes), params.dropout),
        "strategy": {
            "name": params.strategy,
            "last_blocks": params.last_blocks if params.strategy == "last_blocks" else None,
            "trainable_blocks": trained_blocks(backbone),
            "requested": job.choice["requested"] if job.choice else params.strategy,
            "reason": job.choice["reason"] if job.choice else None,
        },
        "init": {"kind": "new"} if warm is None else warm.describe(),
        "transform": backbone.transform_config(),
        "param_counts": backbone.param_counts(),
        "best_epoch": state.best_epoch,
        # what finetune.autocast gave on this hardware: the figures depend on it
        "trained_in": session.trained_in,
    }


def _metrics(backbone: Backbone, state: LoopState) -> dict[str, Any]:
    """Train/val figures of the best epoch; train ones are running means (augmented, dropout on)."""
    best = state.history[state.best_epoch - 1]
    counts = backbone.param_counts()
    return {
        "val_accuracy": best["val_acc"],
        "val_loss": best["val_loss"],
        "train_accuracy": best["train_acc"],
        "train_loss": best["train_loss"],
        "best_epoch": state.best_epoch,
        "epochs_run": state.epoch,
        "fit_seconds": round(sum(r["seconds"] for r in state.history), 3),
        "params_trainable": counts["trainable"],
        "params_frozen": counts["frozen"],
        "params_total": counts["total"],
    }


def curve_frame(history: list[dict[str, Any]]) -> pd.DataFrame:
    """Per-epoch curve for ``dvc plots`` (step = epoch)."""
    frame = pd.DataFrame(history).rename(columns={"epoch": "step"})
    return frame[list(CURVE_COLUMNS)]


def write_outputs(result: FinetuneResult, out_dir: Path) -> None:
    """Write model.safetensors, then model.json naming its sha256, metrics.json and curve.csv, each atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
    with atomic_path(out_dir / MODEL_FILE, suffix=".safetensors") as tmp:
        # Writing bytes into the prepared temp file keeps the mode atomic_path gave it;
        # save_file replaces the file and leaves it 0600.
        tmp.write_bytes(safetensors.torch.save(state))
        digest = sha256_file(tmp)
    atomic_write_json(out_dir / META_FILE, {**result.meta, "sha256": digest})
    atomic_write_json(out_dir / METRICS_FILE, result.metrics)
    with atomic_path(out_dir / CURVE_FILE, suffix=".csv") as tmp:
        curve_frame(result.history).to_csv(tmp, index=False, lineterminator="\n")


# --------------------------------------------------------------------------- loading



