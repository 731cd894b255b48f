"""The probe of one backbone on the split: forward once, probe every block, measure, recommend, write."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from transferlab.config import ProbeParams
from transferlab.io import sha256_file
from transferlab.models.backbones import Backbone
from transferlab.probe import report
from transferlab.probe.forward import block_vectors, prepare
from transferlab.probe.linear import ProbeError, probe_curve
from transferlab.probe.recommend import Measures, recommend

PARTS = ("train", "val")  # test is never looked at: the recommendation is a model-selection decision
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


def probe(backbone: Backbone, split_csv: Path, images_root: Path, out: Path, params: ProbeParams,
          batch_size: int, device: torch.device | str = "cpu", num_workers: int = 0) -> tuple[dict[str, Any], dict]:
    """Write ``out`` (JSON) and its CSV and PNG; returns the report and timings (seconds, not in the report).

    The report holds only what the inputs decide (no times), so a rerun writes the same bytes and
    finetune, which depends on it, reruns only when the recommendation's inputs change.
    """
    device = torch.device(device)
    split = pd.read_csv(split_csv, dtype={"label": str}, keep_default_na=False)
    split = split[split["part"].isin(PARTS)].reset_index(drop=True)
    for part in PARTS:
        if not (split["part"] == part).any():
            raise ProbeError(f"probe: the {part} split is empty; the probe fits on train and scores on val")
    prepare(backbone, device)
    started = time.perf_counter()
    vectors = block_vectors(backbone, [images_root / p for p in split["path"]], batch_size, device, num_workers)
    forward_s = time.perf_counter() - started
    is_train = (split["part"] == "train").to_numpy()
    labels = split["label"].to_numpy()
    started = time.perf_counter()
    curve = probe_curve(vectors.blocks, [v[is_train] for v in vectors.vectors], labels[is_train],
                        [v[~is_train] for v in vectors.vectors], labels[~is_train], params)
    probe_s = time.perf_counter() - started
    found, record = measures(split, vectors.top1, params.similar_above)
    choice = recommend(curve, found, params)
    content = {
        "backbone": backbone.name,
        "weights": backbone.weights_id,
        "split_sha256": sha256_file(split_csv),
        "params": params.model_dump(),
        "blocks": curve,
        "measures": record,
        "recommendation": choice.as_dict(),
    }
    report.write(out, content)
    return content, {"forward_seconds": round(forward_s, 3), "probe_seconds": round(probe_s, 3)}
