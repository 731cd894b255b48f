"""Evaluate every trained model on the test split, side by side.

Models are the cached-feature heads (``models/heads/<backbone>/<head>``) and
the fine-tuned networks (``models/finetune/<backbone>``). Each is scored on the
test part only; the champion is chosen by a validation figure that the model
recorded when it was trained, so the test split never influences a choice.
The report files are written by :mod:`transferlab.evaluation.reports`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from transferlab.config import EvaluateParams
from transferlab.data.images import image_loader
from transferlab.device import autocast, conv_net_to, images_to
from transferlab.evaluation.metrics import evaluate_predictions, select_best
from transferlab.models.backbones import NO_WEIGHTS, load_backbone
from transferlab.models.features import load_part
from transferlab.models.heads import load_head
from transferlab.paths import REPORT_HTML, evaluate_outputs
from transferlab.training.heads import MAP_HEADS, MODEL_FILE

GIGA = 1e9
TEST = "test"


@dataclass(frozen=True)
class ModelRef:
    """One trained model and where its files are."""

    name: str  # e.g. "efficientnet_lite0-gap", "efficientnet_lite0-finetune"
    kind: str  # "head" or "finetune"
    backbone: str
    head: str  # head kind, or "finetune"
    path: Path


@dataclass
class Scored:
    ref: ModelRef
    y_true: list[str]
    y_pred: list[str]
    classes: list[str]
    proba: np.ndarray | None
    trained: dict[str, Any]  # the model's own metrics.json (train/val figures)
    ids: list[str] = field(default_factory=list)  # the test images (prepared paths), row-aligned


def find_models(heads_root: Path, finetune_root: Path, backbones: list[str], heads: list[str],
                finetuned: list[str]) -> list[ModelRef]:
    refs = [ModelRef(f"{b}-{h}", "head", b, h, heads_root / b / h) for b in backbones for h in heads]
    refs += [ModelRef(f"{b}-finetune", "finetune", b, "finetune", finetune_root / b) for b in finetuned]
    missing = [str(r.path) for r in refs if not (r.path / "metrics.json").exists()]
    if missing:
        raise FileNotFoundError(f"evaluate: trained models missing: {', '.join(missing)}; run `dvc repro` first")
    return refs


def _score_head(ref: ModelRef, features_root: Path) -> tuple[list[str], list[str], list[str], np.ndarray | None,
                                                             list[str]]:
    head = load_head(ref.path / MODEL_FILE)
    part = load_part(features_root / ref.backbone, TEST, need_maps=ref.head in MAP_HEADS)
    X = part.maps if ref.head in MAP_HEADS else part.pooled
    proba = head.predict_proba(X) if hasattr(head, "predict_proba") else None
    classes = [str(c) for c in head.classes_]
    return list(part.labels), [str(p) for p in head.predict(X)], classes, proba, list(part.ids)


def _score_finetuned(ref: ModelRef, split: pd.DataFrame, images_root: Path, batch_size: int, device: torch.device,
                     num_workers: int) -> tuple[list[str], list[str], list[str], np.ndarray, list[str]]:
    from transferlab.models.finetuned import load_finetuned

    module, meta, backbone = load_finetuned(ref.path)
    conv_net_to(module, device)  # the layout extract and finetune run in (device.IMAGE_FORMAT)
    rows = split[split["part"] == TEST]
    items = [(images_root / p, 0) for p in rows["path"]]
    probs = []
    with torch.inference_mode(), autocast(device):
        for images, _ in image_loader(items, backbone.eval_transform, batch_size, device, num_workers):
            logits = module(images_to(images, device)).float()  # autocast may give half precision
            probs.append(torch.softmax(logits, dim=1).cpu().numpy())
    proba = np.concatenate(probs).astype(np.float64)
    proba /= proba.sum(axis=1, keepdims=True)  # float32 softmax rows miss 1 by ~1e-7; log loss checks
    classes = [str(c) for c in meta["classes"]]
    return list(rows["label"]), [classes[i] for i in proba.argmax(axis=1)], classes, proba, list(rows["path"])


def score(ref: ModelRef, features_root: Path, split: pd.DataFrame, images_root: Path, batch_size: int,
          device: torch.device | str = "cpu", num_workers: int = 0) -> Scored:
    """Test predictions of one model.

    A fine-tuned network runs over the test images on ``device`` (``compute.device``,
    resolved) through the one image pipeline; a head scores the cached test
    features, which are small arrays on the host whatever the device.
    """
    if ref.kind == "head":
        y_true, y_pred, classes, proba, ids = _score_head(ref, features_root)
    else:
        y_true, y_pred, classes, proba, ids = _score_finetuned(ref, split, images_root, batch_size,
                                                               torch.device(device), num_workers)
    trained = json.loads((ref.path / "metrics.json").read_text())
    return Scored(ref, y_true, y_pred, classes, proba, trained, ids)


def backbone_gflops(name: str, crop_size: int) -> float:
    """Forward GFLOPs of one image through the backbone (architecture only: nothing downloaded).

    Counted on the meta device: shapes only, no weights initialised and no
    arithmetic done (0.2 s of CPU for Lite0 instead of 2.2 s), the same count.
    """
    with torch.device("meta"):
        backbone = load_backbone(name, weights=NO_WEIGHTS)
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            backbone.forward_features(torch.zeros(1, 3, crop_size, crop_size))
    return counter.get_total_flops() / GIGA


def figures(s: Scored, params: EvaluateParams, gflops: float | None) -> dict[str, Any]:
    """Test figures of one model plus what the comparison table shows."""
    result = evaluate_predictions(s.y_true, s.y_pred, s.classes, s.proba, n_boot=params.n_boot,
                                  seed=params.seed, ci=params.ci, n_bins=params.ece_bins)
    return result | {
        "model": s.ref.name,
        "kind": s.ref.kind,
        "backbone": s.ref.backbone,
        "head": s.ref.head,
        "val_accuracy": s.trained.get("val_accuracy"),
        "val_loss": s.trained.get("val_loss"),
        "train_seconds": s.trained.get("fit_seconds"),
        "params_trainable": s.trained.get("params_trainable"),
        "params_frozen": s.trained.get("params_frozen"),
        "gflops": gflops,
    }


def without_leaks(s: Scored, leaked: set[str]) -> dict[str, Any]:
    """Test accuracy without the test images the audit flagged as likely leaks (``reports/audit.json``)."""
    kept = [i for i, path in enumerate(s.ids) if path not in leaked]
    right = sum(s.y_true[i] == s.y_pred[i] for i in kept)
    return {"accuracy_without_leaks": right / len(kept) if kept else None, "n_without_leaks": len(kept)}


def champion(results: list[dict[str, Any]], params: EvaluateParams) -> dict[str, Any]:
    """The model to register: best validation figure, never a test one.

    A model without ``params.select_by`` (no ``val_loss`` without probabilities)
    cannot be chosen; a SelectionError names ``evaluate.select_by`` when none has it.
    """
    return select_best(results, key=params.select_by, maximize=params.select_by != "val_loss",
                       setting="evaluate.select_by")


def missing_outputs(reports: Path, champion_dir: Path) -> list[Path]:
    """Declared evaluate outputs that do not exist (none, once the reports, the page and the champion are written)."""
    return [p for p in [*evaluate_outputs(reports), reports / REPORT_HTML, champion_dir] if not p.exists()]
