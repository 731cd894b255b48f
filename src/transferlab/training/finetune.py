"""Fine-tune an ImageNet-pretrained backbone end to end with a new classifier head.

The network is the pretrained backbone with its ImageNet classifier swapped
for ``Dropout(p) -> Linear(num_features, K)`` on globally pooled features
(``Backbone.replace_classifier``). Everything architecture-specific -- block
names, where the classifier sits, BatchNorm handling -- goes through the
:class:`~transferlab.models.backbones.Backbone` adapter.

What the training does, and why:

* **Strategy** (``finetune.strategy``): ``head_only`` trains the head alone,
  ``last_blocks`` the head plus the top ``finetune.last_blocks`` named blocks,
  ``full`` everything. Frozen blocks (their BatchNorm, dropout and stochastic
  depth) stay in eval mode while the rest trains (``Backbone.train``), so
  frozen features do not drift.
* **Warm start** (``finetune.init: best_head``): the head starts from the
  cached-feature head of the same backbone with the best *validation*
  accuracy (``models/heads/<backbone>/<head>/metrics.json``; test figures are
  never read). Only heads on pooled features fit the fine-tuned head:

  - ``gap`` (pool -> fc): its ``fc`` is copied as is.
  - ``svm`` (standardise -> LinearSVC): the scaler folds into the linear map,
    ``w' = coef / scale`` and ``b' = intercept - coef @ (mean / scale)``. A
    binary LinearSVC has one score ``s`` (positive class = second class);
    it becomes the logits ``[-s/2, s/2]``, whose difference is ``s`` and
    whose softmax is ``sigmoid(s)``. Hinge-loss scores are not calibrated
    log-odds, so the first epochs rescale them; the decision boundary is kept.
  - ``linear`` reads flattened ``C x H x W`` maps, which do not exist after
    pooling: it is skipped with a note and the best compatible head is used.

* **Optimiser**: discriminative learning rates (head ``lr``, backbone
  ``lr * backbone_lr_factor``: a small backbone rate keeps what ImageNet
  taught it) and no weight decay on biases and normalisation weights
  (parameters with ``ndim <= 1``: decaying them only shifts activations).
  Only trainable parameters reach the optimiser.
* **Schedule**: linear warmup over ``warmup_epochs`` (large early updates
  through a random head would wreck the pretrained features), then cosine
  decay to 0, stepped per batch.
* **Early stopping** on the val split (``monitor``, ``patience``); the weights
  of the best epoch are what is written.
* **Resuming**: after every finished epoch the working checkpoint
  ``checkpoint.pt`` (model, optimiser, scheduler, early-stopping state,
  history and RNG states) is replaced atomically. A rerun with the same
  settings continues after the last finished epoch and ends bit-identical to
  an uninterrupted run on CPU (same torch build and thread count); with
  different settings it starts fresh.

Outputs (``out_dir``): ``model.safetensors`` (state dict of the whole network,
best epoch), ``model.json`` (what :func:`load_finetuned` needs to rebuild
it), ``metrics.json`` (train/val figures only: test is the evaluate stage's),
``curve.csv`` and ``checkpoint.pt``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pickle
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd
import safetensors.torch
import torch
from PIL import Image
from sklearn.utils.class_weight import compute_class_weight
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from transferlab.models.backbones import ALL_BLOCKS, NO_WEIGHTS, Backbone, load_backbone
from transferlab.config import AugmentParams, FinetuneParams, ParamsError
from transferlab.errors import UserError
from transferlab.models.heads import GapHead, SvmHead, load_head
from transferlab.io import atomic_path, atomic_write_json, remove_stale_temps, sha256_file

__all__ = [
    "CHECKPOINT_FILE",
    "CURVE_COLUMNS",
    "CURVE_FILE",
    "FinetuneError",
    "FinetuneJob",
    "FinetuneResult",
    "ImageDataset",
    "META_FILE",
    "METRICS_FILE",
    "MODEL_FILE",
    "SplitData",
    "WarmStart",
    "WarmupCosine",
    "apply_strategy",
    "build_model",
    "choose_warm_start",
    "class_weights",
    "curve_frame",
    "finetune",
    "linear_from_gap",
    "linear_from_svm",
    "load_finetuned",
    "make_optimizer",
    "make_scheduler",
    "new_head",
    "param_groups",
    "read_split",
    "train_transform",
    "trainable_blocks",
    "write_outputs",
]

FORMAT_VERSION = 1  # of model.json and checkpoint.pt; bumped when their layout changes
MODEL_FILE = "model.safetensors"
META_FILE = "model.json"
METRICS_FILE = "metrics.json"
CURVE_FILE = "curve.csv"
CHECKPOINT_FILE = "checkpoint.pt"
CURVE_COLUMNS = ("step", "train_loss", "train_acc", "val_loss", "val_acc", "lr")
HEAD_TYPE = "dropout_linear"
# Cached-feature heads that read pooled vectors, in tie-break order; "linear" reads flattened maps.
POOLED_HEADS = ("gap", "svm")
MAP_HEADS = ("linear",)
HEAD_MODEL_FILE = "model.safetensors"
HEAD_METRICS_FILE = "metrics.json"
SELECTION_KEY = "val_accuracy"  # warm-start choice: a validation figure, never test
# (history key, larger is better) for each finetune.monitor value
MONITORS: Mapping[str, tuple[str, bool]] = MappingProxyType(
    {"val_loss": ("val_loss", False), "val_accuracy": ("val_acc", True)}
)
# Decoding stays in-process: with 2 cores torch's intra-op threads already use
# both for the forward/backward pass, so worker processes would only compete
# for them (plus start-up and IPC costs). In-process augmentation also draws
# from the main torch RNG, which the checkpoint saves, so resuming is exact.
NUM_WORKERS = 0
TRAIN, VAL = "train", "val"
HEAD_GROUP = "head/decay"  # the group whose lr the curve reports (the head's weight matrix is always in it)

StateDict = dict[str, Tensor]
Echo = Callable[[str], None]
EpochHook = Callable[[dict[str, Any]], None]


class FinetuneError(UserError, RuntimeError):
    """Fine-tuning cannot start or did not produce a usable model."""


def _say(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class SplitData:
    """The train and val parts of ``data/split.csv``: (image path, class index) pairs."""

    classes: list[str]
    train: list[tuple[Path, int]]
    val: list[tuple[Path, int]]
    sha256: str  # of split.csv, which lists every image's sha256: identifies the data


def read_split(split_csv: Path, images_root: Path) -> SplitData:
    """Train and val rows of ``split_csv``; the test rows only contribute class names.

    Classes are the sorted labels of all parts, as the extract stage orders them,
    so fine-tuned models and cached-feature heads index classes the same way.
    """
    split = pd.read_csv(split_csv, dtype={"label": str}, keep_default_na=False)
    classes = sorted(split["label"].unique())
    index = {label: i for i, label in enumerate(classes)}

    def part(name: str) -> list[tuple[Path, int]]:
        rows = split[split["part"] == name]
        return [(images_root / p, index[lbl]) for p, lbl in zip(rows["path"], rows["label"])]

    data = SplitData(classes, part(TRAIN), part(VAL), sha256_file(split_csv))
    for name, items in ((TRAIN, data.train), (VAL, data.val)):
        if not items:
            raise FinetuneError(f"{split_csv} has no {name} rows; fine-tuning needs train and val images")
    if len(classes) < 2:
        raise FinetuneError(f"{split_csv} has {len(classes)} class(es); need at least 2")
    return data


class ImageDataset(Dataset):
    """(transformed image, class index) for a list of (path, class index)."""

    def __init__(self, items: list[tuple[Path, int]], transform: Callable[[Any], Tensor]) -> None:
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.items[i]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


def train_transform(backbone: Backbone, augment: AugmentParams) -> Callable[[Any], Tensor]:
    """Training preprocessing: random-resized crops (+ flips), or the eval transform (+ flips)."""
    if augment.random_resized_crop:
        lo, hi = augment.scale
        return backbone.train_transform(scale=(lo, hi), hflip=augment.hflip)
    if augment.hflip:
        return v2.Compose([v2.RandomHorizontalFlip(), backbone.eval_transform])
    return backbone.eval_transform


# --------------------------------------------------------------------------- model


def new_head(num_features: int, n_classes: int, dropout: float) -> nn.Sequential:
    """The fine-tuned classifier on pooled features: ``Dropout(p) -> Linear(C, K)``."""
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, n_classes))


def _head_spec(num_features: int, n_classes: int, dropout: float) -> dict[str, Any]:
    return {"type": HEAD_TYPE, "in_features": num_features, "out_features": n_classes, "dropout": dropout}


def trainable_blocks(strategy: str, last_blocks: int) -> int:
    """``Backbone.set_trainable_blocks`` argument for a ``finetune.strategy``."""
    if strategy == "head_only":
        return 0
    if strategy == "last_blocks":
        return last_blocks
    if strategy == "full":
        return ALL_BLOCKS
    raise ParamsError(f"finetune.strategy: got {strategy!r}; allowed: 'head_only', 'last_blocks', 'full'")


def _trained_blocks(backbone: Backbone) -> list[str]:
    return [name for name, block in backbone.blocks() if any(p.requires_grad for p in block.parameters())]


def apply_strategy(backbone: Backbone, strategy: str, last_blocks: int) -> list[str]:
    """Freeze per ``strategy``; returns the names of the blocks that train (besides the head)."""
    n = trainable_blocks(strategy, last_blocks)
    try:
        backbone.set_trainable_blocks(n)
    except ValueError as err:
        raise ParamsError(f"finetune.last_blocks: {err}") from err
    return _trained_blocks(backbone)


@dataclass(frozen=True)
class WarmStart:
    """Initial head weights taken from a cached-feature head."""

    kind: str  # "gap" or "svm"
    path: str
    sha256: str
    val_accuracy: float
    weight: Tensor  # K x C
    bias: Tensor  # K

    def describe(self) -> dict[str, Any]:
        return {"kind": "best_head", "head": self.kind, "path": self.path, "sha256": self.sha256,
                SELECTION_KEY: self.val_accuracy}


def linear_from_gap(head: GapHead) -> tuple[Tensor, Tensor]:
    """Weight and bias of a fitted GapHead's fc: its logits on pooled features."""
    fc = head.torch_module().fc
    return fc.weight.detach().clone(), fc.bias.detach().clone()


def linear_from_svm(head: SvmHead) -> tuple[Tensor, Tensor]:
    """A fitted SvmHead's standardise -> LinearSVC as one linear map on pooled features.

    Multiclass: logits equal ``decision_function``. Binary: logits ``[-s/2, s/2]``
    for the decision value ``s``, so their difference is ``s`` and the argmax
    agrees with ``predict``.
    """
    scaler, svc = head.model_["scaler"], head.model_["svc"]
    coef = np.asarray(svc.coef_, dtype=np.float64)
    weight = coef / scaler.scale_
    bias = np.asarray(svc.intercept_, dtype=np.float64) - coef @ (scaler.mean_ / scaler.scale_)
    if weight.shape[0] == 1:
        weight, bias = np.concatenate([-weight, weight]) / 2, np.concatenate([-bias, bias]) / 2
    return torch.from_numpy(weight.astype(np.float32)), torch.from_numpy(bias.astype(np.float32))


_FOLD: Mapping[str, Callable[[Any], tuple[Tensor, Tensor]]] = MappingProxyType(
    {"gap": linear_from_gap, "svm": linear_from_svm}
)


def _head_candidate(
    heads_dir: Path, kind: str, classes: list[str], num_features: int, note: Echo
) -> WarmStart | None:
    path = heads_dir / kind / HEAD_MODEL_FILE
    metrics = heads_dir / kind / HEAD_METRICS_FILE
    if not (path.is_file() and metrics.is_file()):
        return None
    head = load_head(path)
    if [str(c) for c in head.classes_] != classes or head.n_features_in_ != num_features:
        note(f"warm start: skipped {kind} head {path}: it was fitted for classes {list(head.classes_)} "
             f"on {head.n_features_in_} features, not {classes} on {num_features}")
        return None
    score = float(json.loads(metrics.read_text(encoding="utf-8"))[SELECTION_KEY])
    weight, bias = _FOLD[kind](head)
    return WarmStart(kind, str(path), sha256_file(path), score, weight, bias)


def choose_warm_start(heads_dir: Path, classes: list[str], num_features: int, note: Echo = _say) -> WarmStart:
    """The cached-feature head with the best val accuracy that fits on pooled features.

    Ties go to the earlier kind in ``POOLED_HEADS`` (gap before svm). Raises
    FinetuneError when no compatible head exists (train_head has not run).
    """
    for kind in MAP_HEADS:
        if (heads_dir / kind).is_dir():
            note(f"warm start: skipped the {kind} head: it reads flattened feature maps, and the fine-tuned "
                 "head sits on pooled features")
    found = [c for kind in POOLED_HEADS if (c := _head_candidate(heads_dir, kind, classes, num_features, note))]
    if not found:
        raise FinetuneError(
            f"finetune.init is best_head, but {heads_dir} has no fitted {' or '.join(POOLED_HEADS)} head for "
            "these classes; run the train_head stages first or set finetune.init: new"
        )
    best = max(found, key=lambda c: (c.val_accuracy, -POOLED_HEADS.index(c.kind)))
    note(f"warm start: head initialised from the {best.kind} head ({SELECTION_KEY} {best.val_accuracy:.4f})")
    return best


def build_model(backbone: Backbone, n_classes: int, params: FinetuneParams, warm: WarmStart | None = None) -> nn.Module:
    """Swap in the new (or warm-started) head and freeze per the strategy; returns ``backbone.module``."""
    head = new_head(backbone.num_features, n_classes, params.dropout)
    if warm is not None:
        linear = head[-1]
        if tuple(warm.weight.shape) != tuple(linear.weight.shape):
            raise FinetuneError(f"warm start from {warm.path}: weight {tuple(warm.weight.shape)} does not fit "
                                f"{tuple(linear.weight.shape)}")
        with torch.no_grad():
            linear.weight.copy_(warm.weight)
            linear.bias.copy_(warm.bias)
    backbone.replace_classifier(head)
    apply_strategy(backbone, params.strategy, params.last_blocks)
    return backbone.module


# --------------------------------------------------------------------------- optimisation


def param_groups(backbone: Backbone, lr: float, backbone_lr_factor: float, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in up to four groups: {head, backbone} x {decay, no_decay}.

    Biases and normalisation weights (``ndim <= 1``) get no weight decay; the
    backbone's learning rate is ``lr * backbone_lr_factor``. Empty groups are left out.
    """
    head_ids = {id(p) for p in backbone.classifier.parameters()}
    groups: dict[str, dict[str, Any]] = {}
    for part, part_lr in (("head", lr), ("backbone", lr * backbone_lr_factor)):
        for decay in (True, False):
            name = f"{part}/{'decay' if decay else 'no_decay'}"
            groups[name] = {"name": name, "params": [], "lr": part_lr, "weight_decay": weight_decay if decay else 0.0}
    for param in backbone.module.parameters():
        if param.requires_grad:
            part = "head" if id(param) in head_ids else "backbone"
            groups[f"{part}/{'decay' if param.ndim > 1 else 'no_decay'}"]["params"].append(param)
    return [g for g in groups.values() if g["params"]]


def make_optimizer(groups: list[dict[str, Any]], params: FinetuneParams) -> torch.optim.Optimizer:
    """AdamW, or SGD with (Nesterov) momentum; per-group lr and weight decay come from ``groups``."""
    if params.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=params.lr, momentum=params.momentum, nesterov=params.momentum > 0)
    return torch.optim.AdamW(groups, lr=params.lr, fused=True)  # one kernel per step: faster on CPU


@dataclass(frozen=True)
class WarmupCosine:
    """LR factor at a batch step: linear warmup to 1 over ``warmup_steps``, then cosine to 0.

    A callable object (not a closure) so LambdaLR's state_dict holds its plain
    int fields, and a checkpoint loads with ``weights_only=True``.
    """

    warmup_steps: int
    total_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer: torch.optim.Optimizer, params: FinetuneParams, steps_per_epoch: int) -> LambdaLR:
    schedule = WarmupCosine(params.warmup_epochs * steps_per_epoch, params.max_epochs * steps_per_epoch)
    return LambdaLR(optimizer, schedule)


def class_weights(data: SplitData, params: FinetuneParams) -> Tensor | None:
    if params.class_weight is None:
        return None
    labels = np.array([label for _, label in data.train])
    weights = compute_class_weight(params.class_weight, classes=np.arange(len(data.classes)), y=labels)
    return torch.as_tensor(weights, dtype=torch.float32)


# --------------------------------------------------------------------------- training state


@dataclass
class _Session:
    """Everything one training run works with."""

    name: str
    backbone: Backbone
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader
    generator: torch.Generator
    device: torch.device
    amp: bool


@dataclass
class _Progress:
    """Early-stopping state, replaced from the checkpoint when resuming."""

    best_metric: float
    best_model: StateDict
    epoch: int = 0  # last finished epoch
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(session: _Session) -> contextlib.AbstractContextManager[Any]:
    # float16 autocast only pays off (and is only well supported) on CUDA.
    if session.amp:
        return torch.autocast(device_type=session.device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def _copy_state(module: nn.Module) -> StateDict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _make_session(backbone: Backbone, model: nn.Module, data: SplitData, params: FinetuneParams) -> _Session:
    device = _device()
    model.to(device)
    generator = torch.Generator().manual_seed(params.seed)
    train_ds = ImageDataset(data.train, train_transform(backbone, params.augment))
    val_ds = ImageDataset(data.val, backbone.eval_transform)
    pin = device.type == "cuda"
    train_loader = DataLoader(train_ds, batch_size=params.batch_size, shuffle=True, generator=generator,
                              num_workers=NUM_WORKERS, pin_memory=pin)
    val_loader = DataLoader(val_ds, batch_size=params.batch_size, shuffle=False, num_workers=NUM_WORKERS,
                            pin_memory=pin)
    optimizer = make_optimizer(param_groups(backbone, params.lr, params.backbone_lr_factor, params.weight_decay),
                               params)
    weight = class_weights(data, params)
    amp = device.type == "cuda"
    return _Session(
        name=backbone.name,
        backbone=backbone,
        model=model,
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, params, len(train_loader)),
        scaler=torch.amp.GradScaler(device.type, enabled=amp),
        loss_fn=nn.CrossEntropyLoss(weight=None if weight is None else weight.to(device)),
        train_loader=train_loader,
        val_loader=val_loader,
        generator=generator,
        device=device,
        amp=amp,
    )


def _fresh_progress(session: _Session, monitor: str) -> _Progress:
    _, maximize = MONITORS[monitor]
    return _Progress(best_metric=-math.inf if maximize else math.inf, best_model=_copy_state(session.model))


# --------------------------------------------------------------------------- one epoch


def _head_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(next(g["lr"] for g in optimizer.param_groups if g["name"] == HEAD_GROUP))


def _train_step(session: _Session, images: Tensor, labels: Tensor) -> tuple[float, int]:
    images = images.to(session.device, non_blocking=True)
    labels = labels.to(session.device, non_blocking=True)
    with _autocast(session):
        logits = session.model(images)
        loss = session.loss_fn(logits, labels)
    session.optimizer.zero_grad(set_to_none=True)
    session.scaler.scale(loss).backward()
    session.scaler.step(session.optimizer)
    session.scaler.update()
    session.scheduler.step()
    return loss.item() * len(labels), int((logits.argmax(dim=1) == labels).sum())


def _train_epoch(session: _Session, epoch: int, max_epochs: int) -> tuple[float, float, float]:
    """One shuffled pass; returns running loss and accuracy (augmented, dropout on) and the first batch's lr."""
    session.backbone.train(True)
    lr = _head_lr(session.optimizer)
    loss_sum, correct, seen = 0.0, 0, 0
    desc = f"finetune {session.name} epoch {epoch}/{max_epochs}"
    for images, labels in tqdm(session.train_loader, desc=desc, unit="batch", leave=False):
        batch_loss, batch_correct = _train_step(session, images, labels)
        loss_sum, correct, seen = loss_sum + batch_loss, correct + batch_correct, seen + len(labels)
    return loss_sum / seen, correct / seen, lr


def _evaluate(session: _Session, loader: DataLoader, desc: str) -> tuple[float, float]:
    """Loss (with the training class weights) and accuracy over ``loader``, in eval mode."""
    session.model.eval()
    logits, labels = [], []
    with torch.inference_mode(), _autocast(session):
        for images, y in tqdm(loader, desc=desc, unit="batch", leave=False):
            logits.append(session.model(images.to(session.device)).float())
            labels.append(y.to(session.device))
    all_logits, all_labels = torch.cat(logits), torch.cat(labels)
    loss = float(session.loss_fn(all_logits, all_labels))
    return loss, float((all_logits.argmax(dim=1) == all_labels).double().mean())


def _run_epoch(session: _Session, progress: _Progress, params: FinetuneParams) -> dict[str, Any]:
    epoch = progress.epoch + 1
    started = time.perf_counter()
    train_loss, train_acc, lr = _train_epoch(session, epoch, params.max_epochs)
    val_loss, val_acc = _evaluate(session, session.val_loader, f"finetune {session.name} val")
    record = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
              "val_acc": val_acc, "lr": lr, "seconds": round(time.perf_counter() - started, 3)}
    progress.history.append(record)
    progress.epoch = epoch
    _update_best(progress, record, params.monitor, session.model)
    return record


def _update_best(progress: _Progress, record: dict[str, Any], monitor: str, model: nn.Module) -> None:
    key, maximize = MONITORS[monitor]
    value = record[key]
    # NaN compares False both ways, so a diverged epoch never counts as an improvement.
    if (value > progress.best_metric) if maximize else (value < progress.best_metric):
        progress.best_metric, progress.best_epoch, progress.bad_epochs = float(value), record["epoch"], 0
        progress.best_model = _copy_state(model)
    else:
        progress.bad_epochs += 1


def _finished(progress: _Progress, params: FinetuneParams) -> bool:
    return progress.epoch >= params.max_epochs or progress.bad_epochs >= params.patience


def _epoch_line(name: str, record: dict[str, Any], max_epochs: int, best: bool) -> str:
    return (f"finetune@{name} epoch {record['epoch']}/{max_epochs}: train loss {record['train_loss']:.4f} "
            f"acc {record['train_acc']:.3f} | val loss {record['val_loss']:.4f} acc {record['val_acc']:.3f} | "
            f"lr {record['lr']:.2e} | {record['seconds']:.1f}s{' *' if best else ''}")


# --------------------------------------------------------------------------- checkpoint


def _checkpoint(session: _Session, progress: _Progress, identity: dict[str, Any]) -> dict[str, Any]:
    """Plain dict of state dicts, numbers, strings and lists: loads with weights_only=True."""
    cuda_rng = torch.cuda.get_rng_state_all() if session.device.type == "cuda" else []
    return {
        "format": FORMAT_VERSION,
        "params": identity,
        "model": session.model.state_dict(),
        "optimizer": session.optimizer.state_dict(),
        "scheduler": session.scheduler.state_dict(),
        "scaler": session.scaler.state_dict(),
        "epoch": progress.epoch,
        "best_model": progress.best_model,
        "best_metric": progress.best_metric,
        "best_epoch": progress.best_epoch,
        "bad_epochs": progress.bad_epochs,
        "history": progress.history,
        "rng": {"torch": torch.get_rng_state(), "loader": session.generator.get_state(), "cuda": cuda_rng},
    }


def _save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(checkpoint, tmp)


def _read_checkpoint(path: Path, note: Echo) -> dict[str, Any] | None:
    for stale in remove_stale_temps(path):  # a SIGKILL during a save leaves its temporary behind
        note(f"removed {stale.name}, left by an interrupted checkpoint write")
    if not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        # Written atomically, so this means another torch version or a foreign file: it is only a resume aid.
        note(f"cannot read {path} ({err}); starting fresh")
        return None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT_VERSION:
        note(f"{path} is not a format-{FORMAT_VERSION} finetune checkpoint; starting fresh")
        return None
    return checkpoint


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(obj, Mapping):
        return {prefix: obj}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _differences(old: Any, new: Any) -> list[str]:
    a, b = _flat(old), _flat(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _restore(session: _Session, checkpoint: dict[str, Any]) -> _Progress:
    session.model.load_state_dict(checkpoint["model"])
    session.optimizer.load_state_dict(checkpoint["optimizer"])
    session.scheduler.load_state_dict(checkpoint["scheduler"])
    if session.amp and checkpoint["scaler"]:
        session.scaler.load_state_dict(checkpoint["scaler"])
    rng = checkpoint["rng"]
    torch.set_rng_state(rng["torch"])
    session.generator.set_state(rng["loader"])
    if session.device.type == "cuda" and rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return _Progress(
        best_metric=float(checkpoint["best_metric"]),
        best_model={k: v.to(session.device) for k, v in checkpoint["best_model"].items()},
        epoch=int(checkpoint["epoch"]),
        best_epoch=int(checkpoint["best_epoch"]),
        bad_epochs=int(checkpoint["bad_epochs"]),
        history=list(checkpoint["history"]),
    )


# --------------------------------------------------------------------------- the job


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


@dataclass(frozen=True)
class FinetuneResult:
    model: nn.Module  # best epoch's weights, eval mode
    backbone: Backbone
    meta: dict[str, Any]  # model.json
    metrics: dict[str, Any]  # metrics.json
    history: list[dict[str, Any]]
    notes: list[str]
    resumed_from: int | None  # last finished epoch found in the checkpoint, if training resumed


def _code_digests() -> dict[str, str]:
    modules = (sys.modules[__name__], sys.modules[load_backbone.__module__])
    return {Path(str(m.__file__)).name: sha256_file(Path(str(m.__file__))) for m in modules}


def _identity(job: FinetuneJob, backbone: Backbone, data: SplitData, warm: WarmStart | None) -> dict[str, Any]:
    """What a checkpoint must match to be resumed, or to count as this run's finished result.

    Params, weights, data, warm-start head, and the training code: a DVC rerun
    after a code change must train again, not rewrite outputs from a checkpoint
    the old code made. ``finetune.backbones`` is left out: adding another
    backbone to the list must not restart this one.
    """
    params = job.params.model_dump(exclude={"backbones"})
    identity = {
        "backbone": job.backbone,
        "weights": backbone.weights_id,
        "params": params,
        "classes": data.classes,
        "split_sha256": data.sha256,
        "init": None if warm is None else {"head": warm.kind, "sha256": warm.sha256},
        "code": _code_digests(),
    }
    return json.loads(json.dumps(identity))  # the plain types a weights_only load gives back


def _prepare(job: FinetuneJob, note: Echo) -> tuple[Backbone, nn.Module, SplitData, WarmStart | None]:
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
            warm = choose_warm_start(job.heads_dir, data.classes, backbone.num_features, note)
    return backbone, build_model(backbone, len(data.classes), params, warm), data, warm


def finetune(job: FinetuneJob, echo: Echo = _say, on_epoch_end: EpochHook | None = None) -> FinetuneResult:
    """Fine-tune ``job.backbone``, resuming from ``out_dir/checkpoint.pt`` when it matches; write outputs.

    ``echo`` receives progress and notes (resume, warm start, skipped heads);
    ``on_epoch_end`` is called with each finished epoch's record after its
    checkpoint is written.
    """
    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        echo(message)

    params = job.params
    backbone, model, data, warm = _prepare(job, note)
    identity = _identity(job, backbone, data, warm)
    session = _make_session(backbone, model, data, params)
    path = job.out_dir / CHECKPOINT_FILE
    progress, resumed_from = _start(session, identity, path, params, note)
    while not _finished(progress, params):
        record = _run_epoch(session, progress, params)
        _save_checkpoint(path, _checkpoint(session, progress, identity))
        echo(_epoch_line(job.backbone, record, params.max_epochs, progress.best_epoch == record["epoch"]))
        if on_epoch_end is not None:
            on_epoch_end(record)
    if progress.best_epoch == 0:
        raise FinetuneError(f"training diverged: {params.monitor} was never finite; try a lower finetune.lr")
    session.model.load_state_dict(progress.best_model)
    session.model.eval()
    meta = _meta(job, backbone, data, warm, progress)
    result = FinetuneResult(session.model, backbone, meta, _metrics(backbone, progress), progress.history, notes,
                            resumed_from)
    write_outputs(result, job.out_dir)
    return result


def _start(
    session: _Session, identity: dict[str, Any], path: Path, params: FinetuneParams, note: Echo
) -> tuple[_Progress, int | None]:
    """Progress restored from a matching checkpoint, or fresh; says which."""
    name = identity["backbone"]
    checkpoint = _read_checkpoint(path, note)
    if checkpoint is not None and checkpoint["params"] == identity:
        progress = _restore(session, checkpoint)
        if _finished(progress, params):
            why = "early stopping" if progress.bad_epochs >= params.patience else "max_epochs"
            note(f"finetune@{name}: checkpoint says training finished ({why} after epoch {progress.epoch} of "
                 f"{params.max_epochs}); writing outputs without training")
        else:
            note(f"resuming finetune@{name} from checkpoint: epoch {progress.epoch} of {params.max_epochs} finished")
        return progress, progress.epoch
    if checkpoint is not None:
        changed = "; ".join(_differences(checkpoint["params"], identity)[:5])
        note(f"finetune@{name}: the checkpoint was made with different settings ({changed}); starting fresh")
    return _fresh_progress(session, params.monitor), None


# --------------------------------------------------------------------------- outputs


def _meta(
    job: FinetuneJob,
    backbone: Backbone,
    data: SplitData,
    warm: WarmStart | None,
    progress: _Progress,
) -> dict[str, Any]:
    params = job.params
    return {
        "format": FORMAT_VERSION,
        "backbone": backbone.name,
        "weights": backbone.weights_id,
        "classes": data.classes,
        "head": _head_spec(backbone.num_features, len(data.classes), params.dropout),
        "strategy": {
            "name": params.strategy,
            "last_blocks": params.last_blocks if params.strategy == "last_blocks" else None,
            "trainable_blocks": _trained_blocks(backbone),
        },
        "init": {"kind": "new"} if warm is None else warm.describe(),
        "transform": backbone.transform_config(),
        "param_counts": backbone.param_counts(),
        "best_epoch": progress.best_epoch,
    }


def _metrics(backbone: Backbone, progress: _Progress) -> dict[str, Any]:
    """Train/val figures of the best epoch; train ones are running means (augmented, dropout on)."""
    best = progress.history[progress.best_epoch - 1]
    counts = backbone.param_counts()
    return {
        "val_accuracy": best["val_acc"],
        "val_loss": best["val_loss"],
        "train_accuracy": best["train_acc"],
        "train_loss": best["train_loss"],
        "best_epoch": progress.best_epoch,
        "epochs_run": progress.epoch,
        "fit_seconds": round(sum(r["seconds"] for r in progress.history), 3),
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


def _comparable(transform: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in transform.items() if k != "source"}


def load_finetuned(directory: str | Path) -> tuple[nn.Module, dict[str, Any], Backbone]:
    """Rebuild a fine-tuned network from ``model.safetensors`` + ``model.json`` in ``directory``.

    Returns (the network in eval mode, the model.json metadata, its Backbone
    adapter, whose ``eval_transform`` is the preprocessing to use). Nothing is
    downloaded: the architecture is built with random init, then every tensor
    is loaded strictly.
    """
    directory = Path(directory)
    meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{directory / META_FILE}: unsupported format {meta.get('format')!r}; expected {FORMAT_VERSION}"
        )
    path = directory / MODEL_FILE
    digest = sha256_file(path)
    if digest != meta.get("sha256"):
        raise ValueError(f"{path}: checksum {digest} does not match {META_FILE} ({meta.get('sha256')})")
    backbone = load_backbone(meta["backbone"], weights=NO_WEIGHTS)
    if _comparable(backbone.transform_config()) != _comparable(meta["transform"]):
        # torchvision gives a random-init model its DEFAULT weights' preprocessing, which differs
        # from e.g. IMAGENET1K_V1's for some models; predicting with the wrong one is silently worse.
        raise ValueError(
            f"{directory}: {meta['backbone']} was fine-tuned with preprocessing {meta['transform']}, but "
            f"rebuilding it gives {backbone.transform_config()}"
        )
    head = meta["head"]
    backbone.replace_classifier(new_head(head["in_features"], head["out_features"], head["dropout"]))
    backbone.module.load_state_dict(safetensors.torch.load_file(str(path)), strict=True)
    return backbone.module.eval(), meta, backbone

