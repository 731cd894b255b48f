"""Class activation maps: where a model looked, drawn over the image it saw.

* :func:`gap_cam` -- CAM (Zhou et al. 2016) of the ``gap`` head: its fc weights of one class applied
  at every position of the backbone's last maps (the head's own :meth:`GapHead.cam`), so the map's mean is
  the class logit minus the bias.
* :func:`grad_cam` -- Grad-CAM (Selvaraju et al. 2017) of any network read from the last maps:
  ``ReLU(sum_c alpha_c * maps_c)`` with ``alpha_c`` the spatial mean of d logit / d maps_c. Used for
  fine-tuned networks (maps: the backbone's ``forward_features``; the rest: pool + classifier) and the
  ``linear`` head (on cached maps).
* :func:`overlay` -- the map, upsampled and coloured, blended over the network's view of the image.

Written here rather than taken from the ``grad-cam`` package (pytorch-grad-cam): that package pulls
in opencv-python and ttach for what is here one autograd call, because our Backbone adapter already
splits every network at its last maps (``forward_features`` / ``pool`` / ``classifier``), so no forward
hooks on a guessed target layer are needed, and the upsampling and colouring are Pillow and matplotlib,
which the project already uses.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

CAM_ALPHA = 0.45  # weight of the coloured map over the image
CAM_COLORMAP = "jet"


def gap_cam(head: Any, maps: np.ndarray, class_index: int) -> np.ndarray:
    """CAM ``(H, W)`` of one image's maps ``(C, H, W)`` for class ``class_index`` of a fitted GapHead."""
    return np.asarray(head.cam(np.asarray(maps, dtype=np.float32)[None])[0, class_index], dtype=np.float32)


def grad_cam(from_maps: Callable[[torch.Tensor], torch.Tensor], maps: torch.Tensor, class_index: int) -> np.ndarray:
    """Grad-CAM ``(H, W)`` of one image's maps ``(1, C, H, W)``; ``from_maps`` turns maps into logits."""
    maps = maps.detach().float().requires_grad_(True)
    with torch.enable_grad():
        logits = from_maps(maps)
        (grads,) = torch.autograd.grad(logits[0, class_index], maps)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * maps).sum(dim=1))[0].detach().cpu().numpy().astype(np.float32)


def network_cam(backbone: Any, image: torch.Tensor, class_index: int) -> np.ndarray:
    """Grad-CAM of a fine-tuned network (a Backbone adapter holding its new classifier) on one image tensor."""
    with torch.no_grad():
        maps = backbone.forward_features(image[None].float())
    return grad_cam(lambda m: backbone.classifier(backbone.pool(m)), maps, class_index)


def network_view(transform: Any, image: Image.Image) -> Image.Image:
    """The RGB crop the network sees: the eval transform's geometric steps (before tensor conversion)."""
    from torchvision.transforms import v2

    steps = [t for t in transform.transforms if not isinstance(t, (v2.ToImage, v2.ToDtype, v2.Normalize,
                                                                   v2.ToPureTensor))]
    return v2.Compose(steps)(image)


def overlay(image: Image.Image, cam: np.ndarray) -> Image.Image:
    """``cam`` scaled to [0, 1], upsampled to ``image`` (bilinear), coloured and blended over it."""
    from matplotlib import colormaps

    cam = np.nan_to_num(np.asarray(cam, dtype=np.float64))
    span = cam.max() - cam.min()
    scaled = (cam - cam.min()) / span if span > 0 else np.zeros_like(cam)
    small = Image.fromarray((scaled * 255).astype(np.uint8))
    big = np.asarray(small.resize(image.size, Image.Resampling.BILINEAR), dtype=np.float64) / 255
    heat = Image.fromarray((colormaps[CAM_COLORMAP](big)[..., :3] * 255).astype(np.uint8))
    return Image.blend(image.convert("RGB"), heat, CAM_ALPHA)
