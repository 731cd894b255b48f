"""The audit stage's job: ``reports/audit.json`` and its thumbnail sheets, from one feature store.

``audit.json`` holds ingest's duplicate groups (exact and near, by their
sources under ``data/raw``), the likely leaks across split parts, the test
images among them (evaluate scores every model without them too) and the
ranked label suspects. Paths are those of ``data/prepared`` (``path``) with the
raw file each came from (``source``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from transferlab.audit.labels import label_suspects
from transferlab.audit.leaks import find_leaks, leaked
from transferlab.audit.sheets import leak_sheet, suspect_sheet
from transferlab.config import PARTS, AuditParams
from transferlab.audit.show import AuditError, read_audit  # noqa: F401 - read_audit: re-exported for evaluate
from transferlab.io import atomic_write_json
from transferlab.models.features import PartFeatures, load_part

LEAK_SHEET = "leaks.png"
SUSPECT_SHEET = "label_suspects.png"
FIT_PARTS = ("train", "val")  # the parts the models learn from and are chosen on: where label errors matter


def _parts(store: Path) -> dict[str, PartFeatures]:
    if not (store / "manifest.json").exists():
        raise AuditError(f"no feature store at {store}: run `dvc repro` (extract) first, or set audit.backbone "
                         "to a name among extract.backbones")
    return {p: load_part(store, p, need_maps=False) for p in PARTS if (store / f"{p}.index.csv").exists()}


def _sources(manifest_csv: Path) -> dict[str, str]:
    manifest = pd.read_csv(manifest_csv, dtype=str, keep_default_na=False)
    return dict(zip(manifest["path"], manifest["source"]))


def _suspects(parts: dict[str, PartFeatures], params: AuditParams) -> dict[str, Any]:
    fit = [p for p in FIT_PARTS if p in parts]
    X = np.concatenate([parts[p].pooled for p in fit])
    labels = np.concatenate([parts[p].labels for p in fit]).astype(str)
    ids = [i for p in fit for i in parts[p].ids]
    part_of = [p for p in fit for _ in parts[p].ids]
    return label_suspects(X, labels, ids, part_of, params.label_issues)


def audit(store: Path, images: Path, manifest_csv: Path, ingest_report: Path, params: AuditParams,
          out_json: Path, sheets: Path) -> dict[str, Any]:
    """Audit feature store ``store``; write ``out_json`` and the sheets into ``sheets``; return the report.

    ``images``: the prepared folder the store's ids are relative to (``data/prepared``).
    """
    parts = _parts(Path(store))
    source = _sources(manifest_csv)
    ingested = json.loads(Path(ingest_report).read_text(encoding="utf-8"))
    leaks = find_leaks(parts, params.leak_threshold)
    for leak in leaks:
        leak["source"], leak["match_source"] = source.get(leak["path"], ""), source.get(leak["match"], "")
    labels = _suspects(parts, params)
    for suspect in labels["suspects"]:
        suspect["source"] = source.get(suspect["path"], "")
    report = {
        "backbone": Path(store).name,
        "params": params.model_dump(),
        "duplicates": ingested.get("duplicates", []),
        "near_duplicates": ingested.get("near_duplicates", []),
        "leaks": leaks,
        "leaked_test_images": leaked(leaks, "test"),
        "label_suspects": labels["suspects"],
        "label_issues_flagged": labels["flagged"],
        "label_issues_folds": labels["folds"],
        "counts": {
            "images": {p: len(f.ids) for p, f in parts.items()},
            "duplicate_groups": len(ingested.get("duplicates", [])),
            "near_duplicate_groups": len(ingested.get("near_duplicates", [])),
            "leaks": len(leaks),
            "leaked_test_images": len(leaked(leaks, "test")),
            "label_issues_flagged": labels["flagged"],
        },
        "sheets": {"leaks": (Path(sheets) / LEAK_SHEET).as_posix(), "label_suspects": (Path(sheets) / SUSPECT_SHEET).as_posix()},
    }
    if "skipped" in labels:
        report["label_issues_skipped"] = labels["skipped"]
    Path(sheets).mkdir(parents=True, exist_ok=True)
    leak_sheet(leaks, Path(images), Path(sheets) / LEAK_SHEET, params.sheet_rows)
    suspect_sheet(labels["suspects"], Path(images), Path(sheets) / SUSPECT_SHEET, params.sheet_rows)
    atomic_write_json(out_json, report)
    return report
