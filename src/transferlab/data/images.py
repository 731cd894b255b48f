"""The one image Dataset and its DataLoader: (path, class index) pairs in, (tensor, label) batches out.

Each item is decoded once, by :func:`transferlab.data.imaging.open_rgb` (open,
EXIF orientation, RGB, file closed), then handed to the caller's transform, so
every stage that reads images sees the same pixels. DataLoader settings that
depend on the device (pinned memory, kept workers) come from
:func:`transferlab.device.loader_kwargs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from transferlab.data.imaging import open_rgb
from transferlab.device import loader_kwargs

Transform = Callable[[Image.Image], Tensor]


class ImageDataset(Dataset[tuple[Tensor, int]]):
    """(transformed RGB image, class index) for each ``(path, class index)`` of ``items``."""

    def __init__(self, items: Sequence[tuple[Path, int]], transform: Transform) -> None:
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.items[i]
        return self.transform(open_rgb(Path(path))), int(label)


def image_loader(
    items: Sequence[tuple[Path, int]],
    transform: Transform,
    batch_size: int,
    device: torch.device | str,
    num_workers: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    sampler: Sampler[int] | None = None,
) -> DataLoader[tuple[Tensor, int]]:
    """A DataLoader of :class:`ImageDataset` batches ``(N x C x H x W tensor, N labels)`` for ``device``.

    ``num_workers`` processes decode in parallel (``compute.num_workers``; 0:
    in this process). With ``shuffle``, pass a seeded ``generator`` for a
    reproducible order; it also seeds the workers' random augmentations.
    ``sampler`` (e.g. a DistributedSampler) decides the order instead of ``shuffle``.
    """
    return DataLoader(
        ImageDataset(items, transform),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        sampler=sampler,
        **loader_kwargs(device, num_workers),
    )
