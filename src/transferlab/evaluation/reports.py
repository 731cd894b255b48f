"""Report files built from the figures of :mod:`transferlab.evaluation.metrics`.

The comparison table (CSV and Markdown), the confusion matrices (one row per test
image for DVC's ``confusion`` template, and a PNG), the ROC curves and the
``metrics.json`` that ``dvc metrics`` and MLflow track. Every file is written
atomically: a crash leaves the previous file, never half of a new one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd

from transferlab.io import atomic_path, atomic_write_json, atomic_write_text
from transferlab.paths import REPORT_COMPARISON_CSV, REPORT_COMPARISON_MD, REPORT_CONFUSION, \
    REPORT_CONFUSION_PNG, REPORT_METRICS, REPORT_ROC

if TYPE_CHECKING:
    from transferlab.evaluation.evaluate import Scored

HEAD_KINDS = ("head", "finetune")
REQUIRED_RESULT_KEYS = ("model", "kind", "backbone", "accuracy", "accuracy_ci", "balanced_accuracy", "macro_f1")
# accuracy_without_leaks / n_without_leaks: on the test images the audit did not flag as likely leaks
OPTIONAL_FLOAT_KEYS = ("log_loss", "ece", "train_seconds", "gflops", "accuracy_without_leaks")
OPTIONAL_INT_KEYS = ("params_trainable", "params_frozen", "n_without_leaks")
TABLE_COLUMNS = (
    "rank", "model", "kind", "backbone", "accuracy", "accuracy_95ci", "accuracy_ci_low", "accuracy_ci_high",
    "balanced_accuracy", "macro_f1", "log_loss", "ece", "train_seconds", "params_trainable", "params_frozen", "gflops",
    "accuracy_without_leaks", "n_without_leaks",
)
# The Markdown table is for reading: the interval as one string, no duplicate columns.
MARKDOWN_COLUMNS = (
    "rank", "model", "kind", "accuracy_95ci", "accuracy_without_leaks", "balanced_accuracy", "macro_f1", "log_loss",
    "ece", "train_seconds", "params_trainable", "params_frozen", "gflops",
)
MARKDOWN_DECIMALS = 3
# What metrics.json holds per model; figures a model lacks (no probabilities: no log loss) are left out.
METRIC_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "log_loss", "ece", "roc_auc", "errors", "n",
               "accuracy_without_leaks", "n_without_leaks")  # the last two: without the audit's leaked test images


# --------------------------------------------------------------------------- comparison


def _result_row(result: dict[str, Any]) -> dict[str, Any]:
    missing = [key for key in REQUIRED_RESULT_KEYS if key not in result]
    if missing:
        raise ValueError(f"result {result.get('model', '?')!r} lacks {missing}")
    if result["kind"] not in HEAD_KINDS:
        raise ValueError(f"result {result['model']!r}: kind must be one of {HEAD_KINDS}, got {result['kind']!r}")
    low, high = (float(v) for v in result["accuracy_ci"])
    row: dict[str, Any] = {
        "model": str(result["model"]), "kind": result["kind"], "backbone": str(result["backbone"]),
        "accuracy": float(result["accuracy"]),
        "accuracy_95ci": f"{float(result['accuracy']):.3f} [{low:.3f}, {high:.3f}]",
        "accuracy_ci_low": low, "accuracy_ci_high": high,
        "balanced_accuracy": float(result["balanced_accuracy"]), "macro_f1": float(result["macro_f1"]),
    }
    for key in OPTIONAL_FLOAT_KEYS:
        value = result.get(key)
        row[key] = math.nan if value is None else float(value)
    for key in OPTIONAL_INT_KEYS:
        value = result.get(key)
        row[key] = pd.NA if value is None else int(value)
    return row


def comparison_table(results: list[dict]) -> pd.DataFrame:
    """One row per model, best first, with a 1-based ``rank``.

    Order: test accuracy desc, macro-F1 desc, log loss asc (missing last), model name.
    This ranks for *reporting*; the champion is chosen by
    :func:`transferlab.evaluation.metrics.select_best`. ``accuracy_95ci`` reads like
    "0.951 [0.915, 0.980]" (the results' ``accuracy_ci``). Missing optional figures
    are NaN (float columns) or <NA> (integer columns).
    """
    rows = [_result_row(r) for r in results]
    names = [row["model"] for row in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate model names: {sorted({n for n in names if names.count(n) > 1})}")
    table = pd.DataFrame(rows, columns=[c for c in TABLE_COLUMNS if c != "rank"])
    for key in OPTIONAL_INT_KEYS:
        table[key] = table[key].astype("Int64")
    for key in OPTIONAL_FLOAT_KEYS:
        table[key] = table[key].astype("float64")
    table = table.sort_values(
        ["accuracy", "macro_f1", "log_loss", "model"],
        ascending=[False, False, True, True],
        na_position="last",
        kind="stable",
    ).reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table


def _is_number(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def markdown_table(table: pd.DataFrame) -> str:
    """A pipe (GitHub) Markdown table: floats with 3 decimals, ints as is, missing empty.

    Numbers are right-aligned; text columns are never parsed as numbers (a model
    named "1e3" stays "1e3") and their ``|`` is escaped.
    """
    numeric = [_is_number(table[c]) for c in table.columns]
    shown = table.astype(object).where(table.notna(), None)
    for column, number in zip(table.columns, numeric):
        if not number:
            shown[column] = [None if v is None else str(v).replace("|", "\\|").replace("\n", " ")
                             for v in shown[column]]
    text = shown.to_markdown(
        index=False, tablefmt="pipe", floatfmt=f".{MARKDOWN_DECIMALS}f", missingval="",
        colalign=["right" if number else "left" for number in numeric],
        disable_numparse=[i for i, number in enumerate(numeric) if not number],
    )
    return text + "\n"


def write_comparison(table: pd.DataFrame, csv_path: Path, md_path: Path) -> None:
    """Write ``table`` as CSV (full precision, missing empty) and as Markdown, each atomically."""
    atomic_write_text(csv_path, table.to_csv(index=False, lineterminator="\n"))
    shown = [c for c in MARKDOWN_COLUMNS if c in table.columns]
    atomic_write_text(md_path, markdown_table(table[shown]))


# --------------------------------------------------------------------------- confusion


def confusion_rows(y_true: Sequence[str], y_pred: Sequence[str], model: str) -> list[dict[str, str]]:
    """One row per test image for DVC's ``confusion`` plot template (x: actual, y: predicted)."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true and y_pred differ in length: {len(y_true)} vs {len(y_pred)}")
    return [{"model": model, "actual": str(a), "predicted": str(b)} for a, b in zip(y_true, y_pred)]


def plot_confusion_png(confusion: list[list[int]], classes: Sequence[str], title: str, path: Path) -> None:
    """Write the confusion matrix (rows actual, columns predicted) as an annotated PNG, atomically.

    Drawn by scikit-learn's ConfusionMatrixDisplay on a figure rendered by the Agg
    canvas, so no window opens and pyplot's list of open figures is untouched.
    """
    # Imported here: only this function needs matplotlib.
    from matplotlib.artist import setp
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    cm = np.asarray(confusion, dtype=np.int64)
    k = len(classes)
    if cm.shape != (k, k):
        raise ValueError(f"confusion must be {k}x{k} for {k} classes, got shape {cm.shape}")
    side = min(max(4.0, 0.6 * k + 2.0), 30.0)  # readable cells without giant images
    fig = Figure(figsize=(side, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    display = ConfusionMatrixDisplay(cm, display_labels=[str(c) for c in classes])
    display.plot(ax=ax, cmap="Blues", values_format="d", xticks_rotation=45, im_kw={"vmin": 0})
    setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor")
    ax.set(xlabel="predicted", ylabel="actual", title=title)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        # No "Software" tag: identical matrices give identical bytes across matplotlib versions.
        fig.savefig(tmp, format="png", metadata={"Software": None})


# --------------------------------------------------------------------------- report files


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
    class; more: one-vs-rest per class and the micro and macro averages). A model
    without probabilities has no curves; ``roc/`` exists even when no model has one.
    """
    atomic_write_json(reports / REPORT_METRICS, {r["model"]: metric_summary(r) for r in results})
    write_comparison(comparison_table(results), reports / REPORT_COMPARISON_CSV, reports / REPORT_COMPARISON_MD)
    for s, r in zip(scored, results):
        name = s.ref.name
        table = pd.DataFrame(confusion_rows(s.y_true, s.y_pred, name), columns=["model", "actual", "predicted"])
        with atomic_path(reports / REPORT_CONFUSION / f"{name}.csv", suffix=".csv") as tmp:
            table[["actual", "predicted"]].to_csv(tmp, index=False, lineterminator="\n")
        plot_confusion_png(r["confusion"], s.classes, f"{name} (test)", reports / REPORT_CONFUSION_PNG / f"{name}.png")
        for curve in r.get("roc") or []:
            roc = pd.DataFrame({"fpr": curve["fpr"], "tpr": curve["tpr"]})
            with atomic_path(reports / REPORT_ROC / name / roc_file(curve), suffix=".csv") as tmp:
                roc.to_csv(tmp, index=False, lineterminator="\n")
    (reports / REPORT_ROC).mkdir(parents=True, exist_ok=True)  # declared even when no curve is defined
