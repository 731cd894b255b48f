"""The probe of one backbone on the split: from its feature store, probe every block, measure, recommend, write."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from transferlab.config import ProbeParams
from transferlab.io import sha256_file
from transferlab.models.features import PROBE_PARTS, load_blocks, load_part, read_manifest
from transferlab.probe import report
from transferlab.probe.linear import ProbeError, probe_curve
from transferlab.probe.recommend import Measures, recommend

PARTS = PROBE_PARTS  # test is never looked at: the recommendation is a model-selection decision
SIMILARITY_MEASURE = ("mean top-1 softmax probability of the backbone's own ImageNet classifier over the train "
                      "and val images")


def measures(split: pd.DataFrame, top1: np.ndarray, similar_above: float) -> tuple[Measures, dict[str, Any]]:
    """The 2 x 2 table's two measures, and their JSON record (with the share of confident images)."""
    train = split[split["part"] == "train"]
    per_class = {str(k): int(v) for k, v in train["label"].value_counts().sort_index().items()}
    found = Measures(per_class, float(top1.mean()))
    record = {
        "train_per_class": per_class,
        "val_images": int((split["part"] == "val").sum()),
        "imagenet_similarity": {
            "measure": SIMILARITY_MEASURE,
            "value": found.similarity,
            "share_at_or_above_threshold": float((top1 >= similar_above).mean()),
            "threshold": similar_above,
        },
    }
    return found, record


def probe(store: Path, split_csv: Path, out: Path, params: ProbeParams) -> tuple[dict[str, Any], dict]:
    """Write ``out`` (JSON) and its CSV and PNG from a feature store; returns the report and timings.

    extract keeps every block's pooled output of the train and val images and the ImageNet
    classifier's confidence (models/features.py), so the probe forwards nothing.
    The report holds only what the inputs decide (no times), so a rerun writes the same bytes and
    finetune, which depends on it, reruns only when the recommendation's inputs change.
    """
    manifest = read_manifest(store)
    split = pd.read_csv(split_csv, dtype={"label": str}, keep_default_na=False)
    split = split[split["part"].isin(PARTS)].reset_index(drop=True)
    for part in PARTS:
        if not (split["part"] == part).any():
            raise ProbeError(f"probe: the {part} split is empty; the probe fits on train and scores on val")
    if manifest["split_sha256"] != sha256_file(split_csv):
        raise ProbeError(f"probe: the feature store {store} was extracted from another {split_csv}; rerun extract")
    train, val = (load_blocks(store, part) for part in PARTS)
    train_y, val_y = (load_part(store, part, need_maps=False).labels for part in PARTS)
    started = time.perf_counter()
    curve = probe_curve(train.blocks, train.vectors, train_y, val.vectors, val_y, params)
    probe_s = time.perf_counter() - started
    found, record = measures(split, np.concatenate([train.top1, val.top1]), params.similar_above)
    choice = recommend(curve, found, params)
    content = {
        "backbone": manifest["backbone"],
        "weights": manifest["weights"],
        "split_sha256": manifest["split_sha256"],
        "params": params.model_dump(),
        "blocks": curve,
        "measures": record,
        "recommendation": choice.as_dict(),
    }
    report.write(out, content)
    return content, {"probe_seconds": round(probe_s, 3)}
