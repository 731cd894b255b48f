"""Train one classifier head on a cached feature store and write its outputs.

Every head comes from the head registry (:mod:`transferlab.models.heads.registry`):
its spec says whether it reads the feature maps or the pooled vectors, both
from the same ``extract`` output. Model selection (early stopping, the SVM's
C) sees train and val only: the test part is for ``evaluate``. A head whose
``fit`` takes ``eval_set`` gets the val part for early stopping.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import log_loss

from transferlab.io import atomic_path, atomic_write_json
from transferlab.models.features import PartFeatures, class_counts, load_part, read_manifest
from transferlab.models.heads import registry

MODEL_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
CURVE_FILE = "curve.csv"


class _MapHeads(Set[str]):
    """The registered heads that read feature maps, as the registry says now (not a frozen list)."""

    def _kinds(self) -> tuple[str, ...]:
        return tuple(s.name for s in registry.specs() if s.reads_maps)

    def __contains__(self, kind: object) -> bool:
        return kind in self._kinds()

    def __iter__(self) -> Iterator[str]:
        return iter(self._kinds())

    def __len__(self) -> int:
        return len(self._kinds())


MAP_HEADS: Set[str] = _MapHeads()  # kept for readers of `kind in MAP_HEADS`; prefer registry.spec(kind).reads


def inputs(part: PartFeatures, kind: str) -> np.ndarray:
    """What head ``kind`` reads from one part: the maps or the pooled vectors."""
    return part.maps if registry.spec(kind).reads_maps else part.pooled  # type: ignore[return-value]


def _takes_eval_set(head: Any) -> bool:
    return "eval_set" in inspect.signature(head.fit).parameters


def fit_head(kind: str, params: Any, store: Path,
             device: torch.device | str = "cpu") -> tuple[Any, dict[str, Any], pd.DataFrame]:
    """Fit head ``kind`` with ``params`` (its spec's params model) on ``store``.

    A head whose estimator takes a ``device`` param (the torch heads) trains on
    ``device``; the others (the SVM) run on the host.

    Returns the fitted head, its metrics (train/val only) and its curve.
    """
    head = registry.make_head(kind, params.model_dump())
    if "device" in head.get_params(deep=False):
        head.set_params(device=str(device))
    need_maps = registry.spec(kind).reads_maps
    train = load_part(store, "train", need_maps)
    val = load_part(store, "val", need_maps)
    started = time.perf_counter()
    if _takes_eval_set(head):
        head.fit(inputs(train, kind), train.labels, eval_set=(inputs(val, kind), val.labels))
    else:
        head.fit(inputs(train, kind), train.labels)
    seconds = time.perf_counter() - started
    metrics = {
        "train_accuracy": float(np.mean(head.predict(inputs(train, kind)) == train.labels)),
        "val_accuracy": float(np.mean(head.predict(inputs(val, kind)) == val.labels)),
        "val_loss": _val_loss(head, inputs(val, kind), val.labels),
        "fit_seconds": round(seconds, 3),
        "params_trainable": _trainable(head),
        "params_frozen": int(read_manifest(store)["param_counts"]["total"]),
    }
    return head, metrics | _selection(head), _curve(head)


def _val_loss(head: Any, X: np.ndarray, y: np.ndarray) -> float | None:
    if not hasattr(head, "predict_proba"):
        return None  # e.g. an uncalibrated SVM has no probabilities
    return float(log_loss(y, head.predict_proba(X), labels=head.classes_))


def _trainable(head: Any) -> int | None:
    return int(head.n_params_) if hasattr(head, "n_params_") else None


def _selection(head: Any) -> dict[str, Any]:
    if hasattr(head, "best_epoch_"):
        return {"best_epoch": int(head.best_epoch_), "epochs_run": len(head.history_)}
    if hasattr(head, "best_C_"):
        return {"best_C": float(head.best_C_)}
    return {}


def _curve(head: Any) -> pd.DataFrame:
    """Per-epoch curve (``history_``); CV accuracy per C for a gridded SVM; else just a header."""
    if hasattr(head, "history_"):
        return pd.DataFrame(head.history_).rename(columns={"epoch": "step"})
    if hasattr(head, "cv_scores_"):
        grid = head.C_grid or [head.C]
        scores = head.cv_scores_ if head.cv_scores_ is not None else [np.nan] * len(grid)
        return pd.DataFrame({"step": range(len(grid)), "C": grid, "cv_accuracy": scores})
    return pd.DataFrame({"step": pd.Series([], dtype=int)})


def write_outputs(head: Any, metrics: dict[str, Any], curve: pd.DataFrame, out: Path, metrics_file: Path,
                  curve_file: Path) -> None:
    head.save(out / MODEL_FILE)
    atomic_write_json(metrics_file, metrics)
    with atomic_path(curve_file, suffix=".csv") as tmp:
        curve.to_csv(tmp, index=False, lineterminator="\n")


def check_data(kind: str, params: Any, store: Path) -> None:
    """Params checks that need the data: a params model's ``check_folds`` (the svm's CV folds)."""
    check_folds = getattr(params, "check_folds", None)
    if callable(check_folds):
        check_folds(class_counts(store, "train"), f"train_head.{kind}")


@dataclass(frozen=True)
class HeadResult:
    head: Any
    metrics: dict[str, Any]
    curve: pd.DataFrame


def train_head(kind: str, params: Any, store: Path, out: Path, device: torch.device | str = "cpu") -> HeadResult:
    """The train_head job: fit head ``kind`` on feature store ``store``; write its outputs into ``out``.

    ``params`` is the head's validated section (``config.load(...).train_head.head(kind)``).
    Writes ``model.safetensors`` (+ ``.json``), ``metrics.json`` and ``curve.csv``.
    """
    check_data(kind, params, store)
    head, metrics, curve = fit_head(kind, params, store, device)
    write_outputs(head, metrics, curve, out, out / METRICS_FILE, out / CURVE_FILE)
    return HeadResult(head, metrics, curve)
