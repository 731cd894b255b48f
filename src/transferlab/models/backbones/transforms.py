"""Eval and train preprocessing of a weight set, read from torchvision's or timm's own metadata.

No preprocessing constants live in the adapter: they come from ``weights.transforms()`` or ``pretrained_cfg``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import timm.data
import torch
from PIL import Image
from torch import nn
from torchvision.models import WeightsEnum
from torchvision.transforms import InterpolationMode, v2

from transferlab.models.backbones.base import BackboneError


@dataclass(frozen=True)
class TransformConfig:
    """Eval preprocessing of a weight set: resize shorter side, centre crop, normalise."""

    crop_size: int
    resize_size: int
    interpolation: InterpolationMode
    mean: tuple[float, ...]
    std: tuple[float, ...]
    antialias: bool
    source: str  # where the numbers came from, for manifests

    def as_dict(self) -> dict[str, Any]:
        return {
            "input_size": [len(self.mean), self.crop_size, self.crop_size],
            "resize_size": self.resize_size,
            "crop_size": self.crop_size,
            "interpolation": self.interpolation.value,
            "mean": list(self.mean),
            "std": list(self.std),
            "antialias": self.antialias,
            "source": self.source,
        }


def _weights_name(weights: WeightsEnum) -> str:
    return f"{type(weights).__name__}.{weights.name}"


def _torchvision_transform_config(weights: WeightsEnum) -> TransformConfig:
    preset = weights.transforms()
    if len(preset.crop_size) != 1 or len(preset.resize_size) != 1:
        raise BackboneError(f"{_weights_name(weights)}: only square crops after a shorter-side resize are supported")
    return TransformConfig(
        crop_size=preset.crop_size[0],
        resize_size=preset.resize_size[0],
        interpolation=preset.interpolation,
        mean=tuple(preset.mean),
        std=tuple(preset.std),
        antialias=bool(preset.antialias),
        source=f"torchvision:{_weights_name(weights)}.transforms()",
    )


def _timm_transform_config(model: nn.Module) -> TransformConfig:
    cfg = timm.data.resolve_model_data_config(model)
    _, height, width = cfg["input_size"]
    if height != width or cfg["crop_mode"] != "center":
        raise BackboneError(f"timm config {cfg}: only square centre crops are supported")
    pretrained = model.pretrained_cfg
    return TransformConfig(
        crop_size=height,
        # timm's own eval rule (transforms_factory.transforms_imagenet_eval).
        resize_size=math.floor(height / cfg["crop_pct"]),
        interpolation=InterpolationMode(cfg["interpolation"]),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        antialias=True,  # timm resizes PIL images, which always antialias
        source=f"timm:{pretrained['architecture']}.{pretrained['tag']} pretrained_cfg",
    )


def _to_rgb(image: Any) -> Any:
    # Image folders mix grayscale, palette, RGBA and CMYK files; the networks want 3 channels.
    if isinstance(image, Image.Image) and image.mode != "RGB":
        return image.convert("RGB")
    return image


def _normalized_tensor(cfg: TransformConfig) -> list[Callable[[Any], Any]]:
    # Geometry runs on the PIL image before tensor conversion, as in both
    # torchvision's ImageClassification preset and timm's eval transform, so
    # eval_transform reproduces their outputs to float rounding.
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std), v2.ToPureTensor()]


def _eval_transform(cfg: TransformConfig) -> v2.Compose:
    return v2.Compose(
        [
            v2.Lambda(_to_rgb),
            v2.Resize(cfg.resize_size, interpolation=cfg.interpolation, antialias=cfg.antialias),
            v2.CenterCrop(cfg.crop_size),
            *_normalized_tensor(cfg),
        ]
    )


def _train_transform(cfg: TransformConfig, scale: tuple[float, float], hflip: bool) -> v2.Compose:
    steps: list[Callable[[Any], Any]] = [
        v2.Lambda(_to_rgb),
        v2.RandomResizedCrop(cfg.crop_size, scale=scale, interpolation=cfg.interpolation, antialias=cfg.antialias),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose([*steps, *_normalized_tensor(cfg)])
