"""The probe's files: the report JSON, the curve as CSV (``dvc plots``) and as a PNG, each written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from transferlab.io import atomic_path, atomic_write_json

CURVE_COLUMNS = ("index", "block", "channels", "val_accuracy", "ci_low", "ci_high", "C", "cv_accuracy")


def paths_for(report: Path) -> dict[str, Path]:
    """``<name>.json`` -> its curve files beside it: ``<name>.csv`` and ``<name>.png``."""
    return {"json": report, "csv": report.with_suffix(".csv"), "png": report.with_suffix(".png")}


def write(report: Path, content: dict[str, Any]) -> dict[str, Path]:
    files = paths_for(report)
    atomic_write_json(files["json"], content)
    with atomic_path(files["csv"], suffix=".csv") as tmp:
        pd.DataFrame(content["blocks"])[list(CURVE_COLUMNS)].to_csv(tmp, index=False, lineterminator="\n")
    plot(content, files["png"])
    return files


def read(report: Path) -> dict[str, Any]:
    return json.loads(Path(report).read_text())


def plot(content: dict[str, Any], path: Path) -> None:
    """Val accuracy (with its interval) against block, input to output; the recommended cut marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # only this function needs matplotlib
    from matplotlib.figure import Figure

    blocks = content["blocks"]
    x = list(range(len(blocks)))
    acc = [b["val_accuracy"] for b in blocks]
    fig = Figure(figsize=(max(5.0, 0.55 * len(blocks) + 2.0), 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.fill_between(x, [b["ci_low"] for b in blocks], [b["ci_high"] for b in blocks], alpha=0.2, label="95% CI")
    ax.plot(x, acc, marker="o", label="linear probe, val accuracy")
    rec = content["recommendation"]
    n_train = {"head_only": 0, "full": len(blocks)}.get(rec["strategy"], rec["last_blocks"] or 0)
    if n_train:
        ax.axvspan(len(blocks) - n_train - 0.5, len(blocks) - 0.5, color="tab:orange", alpha=0.12,
                   label="blocks auto trains")
    ax.set_xticks(x, [b["block"] for b in blocks], rotation=45, ha="right")
    ax.set(ylabel="val accuracy", ylim=(0, 1.02),
           title=f"{content['backbone']}: probe per block -> {_describe(rec)}")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})  # same curve, same bytes


def _describe(rec: dict[str, Any]) -> str:
    return f"last_blocks: {rec['last_blocks']}" if rec["strategy"] == "last_blocks" else rec["strategy"]
