"""Train one classifier head on a cached feature store and write its outputs.

The torch heads read the feature maps, the SVM reads the pooled vectors; all
of them come from the same ``extract`` output. Model selection (early stopping,
the SVM's C) sees train and val only: the test part is for ``evaluate``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import log_loss

from transferlab.models.features import PartFeatures, load_part, read_manifest
from transferlab.models.heads import make_head
from transferlab.io import atomic_path, atomic_write_json

MAP_HEADS = ("linear", "gap")  # heads that read maps; the svm reads pooled vectors
MODEL_FILE = "model.safetensors"


def _inputs(part: PartFeatures, kind: str) -> np.ndarray:
    return part.maps if kind in MAP_HEADS else part.pooled  # type: ignore[return-value]


def fit_head(kind: str, params: Any, store: Path) -> tuple[Any, dict[str, Any], pd.DataFrame]:
    """Fit head ``kind`` with ``params`` (a head params dataclass) on ``store``.

    Returns the fitted head, its metrics (train/val only) and its curve.
    """
    head = make_head(kind, params.model_dump())
    need_maps = kind in MAP_HEADS
    train = load_part(store, "train", need_maps)
    val = load_part(store, "val", need_maps)
    started = time.perf_counter()
    if kind in MAP_HEADS:
        head.fit(_inputs(train, kind), train.labels, eval_set=(_inputs(val, kind), val.labels))
    else:
        head.fit(_inputs(train, kind), train.labels)
    seconds = time.perf_counter() - started
    metrics = {
        "train_accuracy": float(np.mean(head.predict(_inputs(train, kind)) == train.labels)),
        "val_accuracy": float(np.mean(head.predict(_inputs(val, kind)) == val.labels)),
        "val_loss": _val_loss(head, _inputs(val, kind), val.labels),
        "fit_seconds": round(seconds, 3),
        "params_trainable": _trainable(head),
        "params_frozen": int(read_manifest(store)["param_counts"]["total"]),
    }
    return head, metrics | _selection(head), _curve(head)


def _val_loss(head: Any, X: np.ndarray, y: np.ndarray) -> float | None:
    if not hasattr(head, "predict_proba"):
        return None  # an uncalibrated SVM has no probabilities
    return float(log_loss(y, head.predict_proba(X), labels=head.classes_))


def _trainable(head: Any) -> int:
    if hasattr(head, "n_params_"):
        return int(head.n_params_)
    svc = head.model_["svc"]
    return int(svc.coef_.size + svc.intercept_.size)


def _selection(head: Any) -> dict[str, Any]:
    if hasattr(head, "best_epoch_"):
        return {"best_epoch": int(head.best_epoch_), "epochs_run": len(head.history_)}
    return {"best_C": float(head.best_C_)}


def _curve(head: Any) -> pd.DataFrame:
    """Per-epoch curve for torch heads; CV accuracy per C for a gridded SVM."""
    if hasattr(head, "history_"):
        return pd.DataFrame(head.history_).rename(columns={"epoch": "step"})
    grid = head.C_grid or [head.C]
    scores = head.cv_scores_ if head.cv_scores_ is not None else [np.nan] * len(grid)
    return pd.DataFrame({"step": range(len(grid)), "C": grid, "cv_accuracy": scores})


def write_outputs(head: Any, metrics: dict[str, Any], curve: pd.DataFrame, out: Path, metrics_file: Path,
                  curve_file: Path) -> None:
    head.save(out / MODEL_FILE)
    atomic_write_json(metrics_file, metrics)
    with atomic_path(curve_file, suffix=".csv") as tmp:
        curve.to_csv(tmp, index=False, lineterminator="\n")
