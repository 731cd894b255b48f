"""The top-loss gallery: the test images each model got most wrong, with where it looked.

Loss is the image's log loss, ``-log p(true class)`` (a model without probabilities: 1 for an error,
0 otherwise), highest first. Each image is shown as the network saw it (the eval transform's resize and
centre crop) and, where the model allows, with a class activation map for the class it predicted
(:mod:`transferlab.models.cam`): CAM for the ``gap`` head from the test image's cached maps, Grad-CAM
for the ``linear`` head (on the cached maps) and for fine-tuned networks (on the backbone's last maps).
Other heads (``svm``, ``knn``) do not read maps through a differentiable layer: their images come without a map.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from transferlab.data.imaging import open_rgb
from transferlab.evaluation.evaluate import TEST, Scored
from transferlab.models import cam
from transferlab.models.features import load_part
from transferlab.models.heads import load_head
from transferlab.paths import MODEL_FILE

JPEG_QUALITY = 85
EPS = 1e-12  # p(true) floor: a log loss of at most 27.6 nats
CAM_METHOD = {"gap": "CAM", "linear": "Grad-CAM", "finetune": "Grad-CAM"}


@dataclass(frozen=True)
class GalleryItem:
    path: str  # the prepared image, relative to data/prepared
    true: str
    predicted: str
    probability: float | None  # of the predicted class
    loss: float
    image: bytes  # JPEG of the network's view
    cam: bytes | None  # JPEG of the map over it; None where the model has none
    method: str | None  # "CAM" / "Grad-CAM"


def losses(s: Scored) -> np.ndarray:
    """Per-image log loss of the true class (0/1 errors without probabilities)."""
    if s.proba is None:
        return np.array([float(t != p) for t, p in zip(s.y_true, s.y_pred)])
    index = {c: i for i, c in enumerate(s.classes)}
    truth = s.proba[np.arange(len(s.y_true)), [index[t] for t in s.y_true]]
    return -np.log(np.clip(truth, EPS, 1.0))


def top_losses(s: Scored, n: int) -> list[int]:
    """Rows of the ``n`` highest losses, highest first (ties in test order)."""
    return [int(i) for i in np.argsort(-losses(s), kind="stable")[:n]]


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _cam_function(s: Scored, features_root: Path, backbones: dict[str, Any]
                  ) -> tuple[Any, Callable[[int, Image.Image, int], np.ndarray] | None]:
    """(the eval transform, row x image x class -> map) of one model; the map function is None without maps."""
    ref = s.ref
    if ref.kind == "finetune":
        from transferlab.models.finetuned import load_finetuned

        _, _, backbone = load_finetuned(ref.path)
        transform = backbone.eval_transform
        return transform, lambda row, image, k: cam.network_cam(backbone, transform(image), k)
    transform = backbones[ref.backbone].eval_transform
    if ref.head not in ("gap", "linear"):
        return transform, None
    head = load_head(ref.path / MODEL_FILE)
    part = load_part(features_root / ref.backbone, TEST, need_maps=True)
    row_of = {path: i for i, path in enumerate(part.ids)}
    maps = part.maps
    if ref.head == "gap":
        return transform, lambda row, image, k: cam.gap_cam(head, maps[row_of[s.ids[row]]], k)
    net = head.torch_module()
    return transform, lambda row, image, k: cam.grad_cam(
        net, torch.from_numpy(np.asarray(maps[row_of[s.ids[row]]], dtype=np.float32)[None]), k)


def gallery(s: Scored, n: int, images_root: Path, features_root: Path, backbones: dict[str, Any]) -> list[GalleryItem]:
    """The ``n`` top-loss test images of one scored model, each with its CAM where the model has one."""
    transform, cam_of = _cam_function(s, features_root, backbones)
    loss = losses(s)
    items = []
    for row in top_losses(s, n):
        image = open_rgb(images_root / s.ids[row])
        view = cam.network_view(transform, image)
        k = s.classes.index(s.y_pred[row])
        overlay = None if cam_of is None else jpeg(cam.overlay(view, cam_of(row, image, k)))
        probability = None if s.proba is None else float(s.proba[row, k])
        items.append(GalleryItem(s.ids[row], s.y_true[row], s.y_pred[row], probability, float(loss[row]),
                                 jpeg(view), overlay, None if cam_of is None else CAM_METHOD[s.ref.head]))
    return items
