"""What fine-tuning trains and how: the head, the freezing strategy, optimiser groups, schedule, session.

* **Strategy** (``finetune.strategy``): ``head_only`` trains the head alone,
  ``last_blocks`` the head plus the top ``finetune.last_blocks`` named blocks,
  ``full`` everything. Frozen blocks (their BatchNorm, dropout and stochastic
  depth) stay in eval mode while the rest trains (``Backbone.train``).
* **Optimiser**: discriminative learning rates (head ``lr``, backbone
  ``lr * backbone_lr_factor``) and no weight decay on biases and normalisation
  weights (``ndim <= 1``). Only trainable parameters reach the optimiser.
* **Schedule**: linear warmup over ``warmup_epochs``, then cosine decay to 0,
  stepped per batch.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, DistributedSampler

from transferlab.config import FinetuneParams, ParamsError
from transferlab.models.backbones import ALL_BLOCKS, Backbone
from transferlab.models.finetuned import HEAD_TYPE, head_spec, new_head  # noqa: F401 - re-exported
from transferlab.data.images import image_loader
from transferlab.distributed.ranks import SINGLE, Ranks
from transferlab.device import autocast_dtype, conv_net_to
from transferlab.training.images import FinetuneError, SplitData, train_transform

__all__ = [
    "Session",
    "WarmupCosine",
    "apply_strategy",
    "build_model",
    "class_weights",
    "make_optimizer",
    "make_scheduler",
    "make_session",
    "new_head",
    "sync_trained_batchnorm",
    "param_groups",
    "trainable_blocks",
    "trained_blocks",
]

HEAD_GROUP = "head/decay"  # the group whose lr the curve reports (the head's weight matrix is always in it)
# Decoding stays in-process: with 2 cores torch's intra-op threads already use
# both for the forward/backward pass, so worker processes would only compete
# for them (plus start-up and IPC costs). In-process augmentation also draws
# from the main torch RNG, which the checkpoint saves, so resuming is exact.
NUM_WORKERS = 0


# --------------------------------------------------------------------------- model


def trainable_blocks(strategy: str, last_blocks: int) -> int:
    """``Backbone.set_trainable_blocks`` argument for a ``finetune.strategy``."""
    if strategy == "head_only":
        return 0
    if strategy == "last_blocks":
        return last_blocks
    if strategy == "full":
        return ALL_BLOCKS
    if strategy == "auto":  # transferlab.probe.choice.resolve replaces it before a model is built
        raise ParamsError("finetune.strategy: auto must be resolved from the probe report before training")
    raise ParamsError(f"finetune.strategy: got {strategy!r}; allowed: 'head_only', 'last_blocks', 'full', 'auto'")


def trained_blocks(backbone: Backbone) -> list[str]:
    return [name for name, block in backbone.blocks() if any(p.requires_grad for p in block.parameters())]


def apply_strategy(backbone: Backbone, strategy: str, last_blocks: int) -> list[str]:
    """Freeze per ``strategy``; returns the names of the blocks that train (besides the head)."""
    n = trainable_blocks(strategy, last_blocks)
    try:
        backbone.set_trainable_blocks(n)
    except ValueError as err:
        raise ParamsError(f"finetune.last_blocks: {err}") from err
    return trained_blocks(backbone)


def build_model(backbone: Backbone, n_classes: int, params: FinetuneParams, warm: Any = None) -> nn.Module:
    """Swap in the new (or warm-started) head and freeze per the strategy; returns ``backbone.module``.

    ``warm``: a :class:`~transferlab.training.warm_start.WarmStart` (its ``weight``, ``bias``), or None.
    """
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


def head_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(next(g["lr"] for g in optimizer.param_groups if g["name"] == HEAD_GROUP))


# --------------------------------------------------------------------------- session


@dataclass
class Session:
    """Everything one training run works with (what the checkpoint saves, and the data)."""

    name: str
    backbone: Backbone
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader
    generator: torch.Generator  # seeded; the train order comes from ``sampler`` (seed + epoch), so resume needs no RNG
    device: torch.device
    amp_dtype: torch.dtype | None  # finetune.autocast resolved for the device; None: float32
    sampler: DistributedSampler[Any]  # the train order: a permutation per epoch (set_epoch), sharded over ranks
    ranks: Ranks = SINGLE
    net: nn.Module | None = None  # what the train step calls: model, or its DistributedDataParallel wrapper

    @property
    def amp(self) -> bool:
        """Whether the loss is scaled: float16 gradients underflow; bfloat16 has float32's range."""
        return self.amp_dtype == torch.float16

    @property
    def trained_in(self) -> str:
        """The dtype the forward passes compute in, by name (``model.json``'s ``trained_in``)."""
        return str(self.amp_dtype or torch.float32).removeprefix("torch.")

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def sync_trained_batchnorm(model: nn.Module) -> list[str]:
    """Swap each BatchNorm that trains for a SyncBatchNorm (in place); returns their names.

    SyncBatchNorm normalises with the statistics of the global batch, as one
    process would. Frozen BatchNorm stays as it is: in eval mode it uses its
    running statistics, with nothing to synchronise. The same Parameter objects
    move over, so an optimiser built before still holds them.
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    swapped = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _BatchNorm) and any(p.requires_grad for p in child.parameters()):
                setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
                swapped.append(f"{parent_name}.{name}" if parent_name else name)
    return swapped


def _data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel; on CUDA its trained BatchNorm synchronised.

    PyTorch's SyncBatchNorm runs on GPUs only: on the CPU (Gloo) a trained
    BatchNorm normalises with its rank's share of the batch (DDP's default).
    Running statistics (buffers) are rank 0's: DDP broadcasts them every step.
    """
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        sync_trained_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def make_session(backbone: Backbone, model: nn.Module, data: SplitData, params: FinetuneParams,
                 device: torch.device | str = "cpu", ranks: Ranks = SINGLE) -> Session:
    """Loaders, optimiser, schedule and loss for ``model``; with several ``ranks``, data-parallel.

    ``finetune.batch_size`` is the global batch: each of the ``world`` ranks
    takes ``batch_size / world`` images of it per step (config validates that it
    divides), and DDP averages their gradients, so a step sees the same images
    and takes the same mean gradient as one process with ``batch_size``. The
    order is DistributedSampler's permutation seeded with ``seed + epoch``
    (one process: the same sampler with one replica); val is sharded by
    ``items[rank::world]`` and gathered back in order for its figures.
    """
    device = torch.device(device)
    conv_net_to(model, device)  # the loop moves its batches with device.images_to: the same layout
    generator = torch.Generator().manual_seed(params.seed)
    per_rank = params.batch_size // ranks.world
    sampler = DistributedSampler(data.train, num_replicas=ranks.world, rank=ranks.rank, shuffle=True,
                                 seed=params.seed)
    # the one image pipeline (transferlab.data.images); NUM_WORKERS: see above (exact resume)
    train_loader = image_loader(data.train, train_transform(backbone, params.augment), per_rank, device,
                                NUM_WORKERS, sampler=sampler)
    val_loader = image_loader(ranks.shard(list(data.val)), backbone.eval_transform, per_rank, device, NUM_WORKERS)
    optimizer = make_optimizer(param_groups(backbone, params.lr, params.backbone_lr_factor, params.weight_decay),
                               params)
    weight = class_weights(data, params)
    amp_dtype = autocast_dtype(device, cpu=True) if params.autocast else None
    return Session(
        name=backbone.name,
        backbone=backbone,
        model=model,
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, params, len(train_loader)),
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        loss_fn=nn.CrossEntropyLoss(weight=None if weight is None else weight.to(device)),
        train_loader=train_loader,
        val_loader=val_loader,
        generator=generator,
        device=device,
        amp_dtype=amp_dtype,
        sampler=sampler,
        ranks=ranks,
        net=_data_parallel(model, device) if ranks.distributed else None,
    )
