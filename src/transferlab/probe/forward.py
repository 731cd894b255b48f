"""One forward pass that keeps every named block's pooled output and the ImageNet classifier's confidence.

Per image: the global average of each block's output (the sum of the blocks'
channel counts in all: 2016 floats for efficientnet_lite0) and the top-1
softmax probability of the backbone's own ImageNet classifier, computed from
the last block's maps (no second pass). Images go through the one image
pipeline (:func:`transferlab.data.images.image_loader`, the weights' eval
transform) in eval mode under ``torch.inference_mode``, as extract does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transferlab.data.images import image_loader
from transferlab.device import autocast, conv_net_to, images_to
from transferlab.memory import release_freed_memory
from transferlab.models.backbones import Backbone

RELEASE_EVERY = 8  # batches between returns of freed heap pages to the OS, as extract does


@dataclass(frozen=True)
class BlockVectors:
    """Pooled block outputs of N images, row-aligned with the paths given."""

    blocks: list[str]  # input to output
    vectors: list[np.ndarray]  # per block: N x C_block float32
    top1: np.ndarray  # N: the ImageNet classifier's top-1 softmax probability


def prepare(backbone: Backbone, device: torch.device) -> None:
    """Frozen, eval mode (BatchNorm keeps its ImageNet statistics), on ``device`` in its conv layout."""
    backbone.module.eval()
    backbone.module.requires_grad_(False)
    conv_net_to(backbone.module, device)


def block_vectors(backbone: Backbone, paths: list[Path], batch_size: int, device: torch.device,
                  num_workers: int = 0) -> BlockVectors:
    """Pooled outputs of every named block and the ImageNet top-1 probability, for each image once."""
    names = [name for name, _ in backbone.blocks()]
    pooled: list[list[torch.Tensor]] = [[] for _ in names]
    top1: list[torch.Tensor] = []
    loader = image_loader([(p, 0) for p in paths], backbone.eval_transform, batch_size, device, num_workers)
    with torch.inference_mode(), autocast(device):
        for batch, (images, _) in enumerate(loader, start=1):
            maps = None
            for i, (_, out) in enumerate(backbone.block_outputs(images_to(images, device))):
                pooled[i].append(backbone.pool(out).float().cpu())
                maps = out
            logits = backbone.imagenet_logits_from_maps(maps).float()
            top1.append(torch.softmax(logits, dim=1).amax(dim=1).cpu())
            del images, maps, logits
            if batch % RELEASE_EVERY == 0:
                release_freed_memory()
    if not top1:
        raise ValueError("block_vectors: no images")
    return BlockVectors(names, [torch.cat(parts).numpy() for parts in pooled], torch.cat(top1).numpy())
