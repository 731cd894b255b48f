"""Evaluate every trained model on the test split, side by side.

Models are the cached-feature heads (``models/heads/<backbone>/<head>``) and
the fine-tuned networks (``models/finetune/<backbone>``). Each is scored on the
test part only; the champion is chosen by a validation figure that the model
recorded when it was trained, so the test split never influences a choice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from transferlab.models.backbones import NO_WEIGHTS, load_backbone
from transferlab.config import EvaluateParams, IngestParams
from transferlab.models.features import load_part
from transferlab.models.heads import load_head
from transferlab.evaluation.metrics import confusion_rows, evaluate_predictions, select_best
from transferlab.paths import REPORT_ROC
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


def find_models(heads_root: Path, finetune_root: Path, backbones: list[str], heads: list[str],
                finetuned: list[str]) -> list[ModelRef]:
    refs = [ModelRef(f"{b}-{h}", "head", b, h, heads_root / b / h) for b in backbones for h in heads]
    refs += [ModelRef(f"{b}-finetune", "finetune", b, "finetune", finetune_root / b) for b in finetuned]
    missing = [str(r.path) for r in refs if not (r.path / "metrics.json").exists()]
    if missing:
        raise FileNotFoundError(f"evaluate: trained models missing: {', '.join(missing)}; run `dvc repro` first")
    return refs


def _score_head(ref: ModelRef, features_root: Path) -> tuple[list[str], list[str], list[str], np.ndarray | None]:
    head = load_head(ref.path / MODEL_FILE)
    part = load_part(features_root / ref.backbone, TEST, need_maps=ref.head in MAP_HEADS)
    X = part.maps if ref.head in MAP_HEADS else part.pooled
    proba = head.predict_proba(X) if hasattr(head, "predict_proba") else None
    classes = [str(c) for c in head.classes_]
    return list(part.labels), [str(p) for p in head.predict(X)], classes, proba


def _score_finetuned(ref: ModelRef, split: pd.DataFrame, images_root: Path,
                     batch_size: int) -> tuple[list[str], list[str], list[str], np.ndarray]:
    from transferlab.training.finetune import load_finetuned

    module, meta, backbone = load_finetuned(ref.path)
    rows = split[split["part"] == TEST]
    probs = []
    for i in range(0, len(rows), batch_size):
        batch = [backbone.eval_transform(Image.open(images_root / p).convert("RGB"))
                 for p in rows["path"].iloc[i : i + batch_size]]
        with torch.inference_mode():
            probs.append(torch.softmax(module(torch.stack(batch)), dim=1).numpy())
    proba = np.concatenate(probs).astype(np.float64)
    proba /= proba.sum(axis=1, keepdims=True)  # float32 softmax rows miss 1 by ~1e-7; log loss checks
    classes = [str(c) for c in meta["classes"]]
    return list(rows["label"]), [classes[i] for i in proba.argmax(axis=1)], classes, proba


def score(ref: ModelRef, features_root: Path, split: pd.DataFrame, images_root: Path,
          batch_size: int) -> Scored:
    if ref.kind == "head":
        y_true, y_pred, classes, proba = _score_head(ref, features_root)
    else:
        y_true, y_pred, classes, proba = _score_finetuned(ref, split, images_root, batch_size)
    trained = json.loads((ref.path / "metrics.json").read_text())
    return Scored(ref, y_true, y_pred, classes, proba, trained)


def backbone_gflops(name: str, crop_size: int) -> float:
    """Forward GFLOPs of one image through the backbone (architecture only: nothing downloaded)."""
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


def champion(results: list[dict[str, Any]], params: EvaluateParams) -> dict[str, Any]:
    """The model to register: best validation figure, never a test one."""
    return select_best(results, key=params.select_by, maximize=params.select_by != "val_loss")


def confusion_table(scored: list[Scored]) -> pd.DataFrame:
    rows = [r for s in scored for r in confusion_rows(s.y_true, s.y_pred, s.ref.name)]
    return pd.DataFrame(rows)


METRIC_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "log_loss", "ece", "roc_auc", "errors", "n")


def metric_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one model that `dvc metrics` and MLflow track."""
    low, high = result["accuracy_ci"]
    out = {k: result[k] for k in METRIC_KEYS if result.get(k) is not None}
    out |= {"accuracy_ci_low": low, "accuracy_ci_high": high}
    out["per_class"] = {c: {"precision": v["precision"], "recall": v["recall"]}
                        for c, v in result["per_class"].items()}
    return out


def roc_file(curve: dict[str, Any]) -> str:
    """``class-<label>.csv`` per one-vs-rest curve, ``average-micro.csv`` / ``average-macro.csv``."""
    return f"class-{curve['name']}.csv" if curve["kind"] == "class" else f"average-{curve['kind']}.csv"


def write_reports(scored: list[Scored], results: list[dict[str, Any]], reports: Path) -> None:
    """metrics.json, comparison.csv/.md, confusion matrices (CSV for dvc plots, PNG) and ROC curves.

    ROC: ``roc/<model>/`` holds one CSV per curve (two classes: the positive
    class; more: one-vs-rest per class and the micro and macro averages).
    """
    from transferlab.io import atomic_path, atomic_write_json
    from transferlab.evaluation.metrics import comparison_table, plot_confusion_png, write_comparison

    atomic_write_json(reports / "metrics.json", {r["model"]: metric_summary(r) for r in results})
    write_comparison(comparison_table(results), reports / "comparison.csv", reports / "comparison.md")
    for s, r in zip(scored, results):
        name = s.ref.name
        table = pd.DataFrame(confusion_rows(s.y_true, s.y_pred, name))[["actual", "predicted"]]
        with atomic_path(reports / "confusion" / f"{name}.csv", suffix=".csv") as tmp:
            table.to_csv(tmp, index=False, lineterminator="\n")
        plot_confusion_png(r["confusion"], s.classes, f"{name} (test)", reports / "confusion_png" / f"{name}.png")
        for curve in r.get("roc") or []:
            roc = pd.DataFrame({"fpr": curve["fpr"], "tpr": curve["tpr"]})
            with atomic_path(reports / REPORT_ROC / name / roc_file(curve), suffix=".csv") as tmp:
                roc.to_csv(tmp, index=False, lineterminator="\n")
    (reports / REPORT_ROC).mkdir(parents=True, exist_ok=True)  # declared even when no curve is defined


def build_predictor(ref: ModelRef, weights: str | None, weights_path: str | None, out: Path,
                    ingest: IngestParams) -> None:
    """Bundle model ``ref`` as a self-contained predictor at ``out``; new images get ``ingest``'s decoding."""
    from transferlab.serving.predictor import save_finetune_predictor, save_head_predictor

    if ref.kind == "finetune":
        save_finetune_predictor(ref.path, out, ingest_params=ingest)
        return
    backbone = load_backbone(ref.backbone, weights, weights_path)
    save_head_predictor(backbone, ref.path / MODEL_FILE, out, weights=weights, ingest_params=ingest)


def missing_outputs(reports: Path, champion_dir: Path) -> list[Path]:
    """Declared evaluate outputs that do not exist (none, once write_reports and build_predictor ran)."""
    from transferlab.paths import evaluate_outputs

    return [p for p in [*evaluate_outputs(reports), champion_dir] if not p.exists()]
