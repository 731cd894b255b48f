"""Test-time augmentation: a model's probabilities averaged over the plain view and a few transformed ones.

``evaluate.tta`` names the views (``hflip``: the network's input mirrored left-right). A TTA result is a
new :class:`Scored` named ``<model>+tta``: a row of its own beside the plain one, so the gain is visible
and the plain figures are never replaced. The champion is never chosen among TTA rows (the registered
predictor classifies one view).

A cached-feature head has no cached features of transformed images, so its backbone runs once per view
over the test images (the same eval transform extract used, then the view), and the head scores the maps
or pooled vectors as it scores the cache. A fine-tuned network runs once per view.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from transferlab.data.images import image_loader
from transferlab.device import autocast, conv_net_to, images_to
from transferlab.evaluation.evaluate import ModelRef, Scored
from transferlab.models.backbones import load_backbone
from transferlab.models.heads import load_head, registry
from transferlab.paths import MODEL_FILE

TTA_SUFFIX = "+tta"
VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "hflip": lambda batch: torch.flip(batch, dims=[3]),  # N x C x H x W: mirror the width axis
}


def _forward_views(network: Callable[[torch.Tensor], np.ndarray], transform: Any, files: list[Path],
                   views: list[str], batch_size: int, device: torch.device, workers: int) -> list[np.ndarray]:
    """Probabilities (N x K) of every view, in ``files`` order."""
    out: dict[str, list[np.ndarray]] = {v: [] for v in views}
    with torch.inference_mode(), autocast(device):
        for images, _ in image_loader([(f, 0) for f in files], transform, batch_size, device, workers):
            images = images_to(images, device)
            for view in views:
                out[view].append(network(VIEWS[view](images)))
    return [np.concatenate(out[v]).astype(np.float64) for v in views]


def _head_network(ref: ModelRef, backbone: Any) -> Callable[[torch.Tensor], np.ndarray]:
    head = load_head(ref.path / MODEL_FILE)
    reads_maps = registry.spec(ref.head).reads_maps

    def network(batch: torch.Tensor) -> np.ndarray:
        maps = backbone.forward_features(batch).float()
        features = maps if reads_maps else backbone.pool(maps)
        return np.asarray(head.predict_proba(features.cpu().contiguous().numpy()))

    return network


def _finetune_network(ref: ModelRef, device: torch.device) -> tuple[Callable[[torch.Tensor], np.ndarray], Any]:
    from transferlab.models.finetuned import load_finetuned

    module, _, backbone = load_finetuned(ref.path)
    conv_net_to(module, device)
    return (lambda batch: torch.softmax(module(batch).float(), dim=1).cpu().numpy()), backbone.eval_transform


def tta_scored(scored: Scored, views: list[str], images_root: Path, batch_size: int, device: torch.device,
               workers: int, backbones: dict[str, Any]) -> Scored | None:
    """``scored`` with its probabilities averaged over the plain view and ``views``; None without probabilities.

    ``backbones``: name -> loaded Backbone (the cached-feature heads' frozen networks), shared across heads.
    """
    if scored.proba is None or not views:
        return None
    ref = scored.ref
    files = [images_root / i for i in scored.ids]
    if ref.kind == "head":
        backbone = backbones[ref.backbone]
        conv_net_to(backbone.module.eval(), device)
        network, transform = _head_network(ref, backbone), backbone.eval_transform
    else:
        network, transform = _finetune_network(ref, device)
    probas = [scored.proba, *_forward_views(network, transform, files, views, batch_size, device, workers)]
    proba = np.mean(probas, axis=0)
    proba /= proba.sum(axis=1, keepdims=True)
    y_pred = [scored.classes[i] for i in proba.argmax(axis=1)]
    return replace(scored, ref=replace(ref, name=ref.name + TTA_SUFFIX), y_pred=y_pred, proba=proba)


def load_backbones(names: list[str], weights: dict[str, str], weights_path: dict[str, str]) -> dict[str, Any]:
    """The frozen backbones of the cached-feature heads, each loaded once (as extract loaded it)."""
    return {n: load_backbone(n, weights.get(n), weights_path.get(n)) for n in names}
