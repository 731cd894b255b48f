"""The report page's plots, as PNG bytes: ROC curves, reliability diagrams and training curves.

Drawn on figures rendered by matplotlib's Agg canvas (no window, pyplot's list of open figures
untouched), as the confusion-matrix PNGs of :mod:`transferlab.evaluation.reports` are.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd

from transferlab.evaluation.metrics import reliability_bins

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from transferlab.evaluation.evaluate import Scored

PANEL = 3.2  # inches per small-multiple panel
COLUMNS = 4  # panels per row
DPI = 80


def _figure(panels: int) -> tuple[Figure, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(COLUMNS, max(panels, 1))
    rows = math.ceil(max(panels, 1) / cols)
    fig = Figure(figsize=(PANEL * cols, PANEL * rows), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(max(panels, 1))]
    return fig, axes


def png(fig: Figure) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def roc_png(results: Sequence[dict[str, Any]]) -> bytes | None:
    """Two classes: every model's ROC curve of the positive class on one plot; None otherwise."""
    curves = [(r["model"], c) for r in results for c in r.get("roc") or [] if c["kind"] == "class"]
    if not curves or len(curves) != len({m for m, _ in curves}):
        return None  # more than one curve per model: three or more classes
    fig, (ax,) = _figure(1)
    fig.set_size_inches(5, 5)
    for model, curve in curves:
        ax.plot(curve["fpr"], curve["tpr"], label=f"{model} (AUC {curve['auc']:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC: {curves[0][1]['name']}")
    ax.legend(fontsize=7, loc="lower right")
    return png(fig)


def reliability_png(scored: Sequence[Scored], n_bins: int) -> bytes | None:
    """One reliability diagram per model with probabilities: accuracy against confidence per bin."""
    shown = [s for s in scored if s.proba is not None]
    if not shown:
        return None
    fig, axes = _figure(len(shown))
    for ax, s in zip(axes, shown):
        index = {c: i for i, c in enumerate(s.classes)}
        bins = reliability_bins(np.array([index[t] for t in s.y_true]), s.proba, n_bins)
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.bar([b["confidence"] for b in bins], [b["accuracy"] for b in bins], width=1 / n_bins, alpha=0.7,
               edgecolor="black")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=s.ref.name)
        ax.title.set_fontsize(8)
    return png(fig)


def curves_png(curves: dict[str, pd.DataFrame]) -> bytes | None:
    """Each model's training curve (loss and accuracy per epoch; an SVM's CV accuracy per C)."""
    shown = {name: c for name, c in curves.items() if len(c) and len(c.columns) > 1}
    if not shown:
        return None
    fig, axes = _figure(len(shown))
    for ax, (name, curve) in zip(axes, shown.items()):
        x = curve["C"] if "C" in curve else curve["step"]
        for column in [c for c in curve.columns if c not in ("step", "C", "lr")]:
            if curve[column].notna().any():
                ax.plot(x, curve[column], marker=".", label=column)
        if "C" in curve:
            ax.set_xscale("log")
        ax.set(xlabel="C" if "C" in curve else "epoch", title=name)
        ax.title.set_fontsize(8)
        ax.legend(fontsize=6)
    return png(fig)
