"""The images fine-tuning reads: the train and val rows of ``data/split.csv``, decoded and transformed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from torch import Tensor
from torchvision.transforms import v2

from transferlab.config import AugmentParams
from transferlab.errors import UserError
from transferlab.io import sha256_file
from transferlab.data.images import ImageDataset  # noqa: F401 - the one image Dataset, re-exported
from transferlab.models.backbones import Backbone

__all__ = ["FinetuneError", "ImageDataset", "SplitData", "read_split", "train_transform"]

TRAIN, VAL = "train", "val"


class FinetuneError(UserError, RuntimeError):
    """Fine-tuning cannot start or did not produce a usable model."""


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


def train_transform(backbone: Backbone, augment: AugmentParams) -> Callable[[Any], Tensor]:
    """Training preprocessing: random-resized crops (+ flips), or the eval transform (+ flips)."""
    if augment.random_resized_crop:
        lo, hi = augment.scale
        return backbone.train_transform(scale=(lo, hi), hflip=augment.hflip)
    if augment.hflip:
        return v2.Compose([v2.RandomHorizontalFlip(), backbone.eval_transform])
    return backbone.eval_transform
