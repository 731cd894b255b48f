"""Model-agnostic figures: test metrics, calibration, bootstrap CIs, ROC curves, the champion.

Everything here works on labels and probabilities only (no torch, MLflow or DVC), so
heads and fine-tuned networks are scored by exactly the same code. Tables, plots and
report files built from these figures are in :mod:`transferlab.evaluation.reports`.

Conventions:

* ``classes`` fixes the order of everything class-indexed: the confusion matrix rows
  (actual) and columns (predicted), the ``per_class`` entries and the columns of
  ``proba``. Labels are mapped to indices in that order before calling scikit-learn,
  because several scikit-learn metrics otherwise assume *sorted* labels.
* Every returned dict is JSON-serializable: plain ``int``/``float``/``str``/``list``,
  with non-finite floats written as ``None`` (JSON has no ``inf``/``nan``).
* Test-set figures are for reporting only; :func:`select_best` picks the champion on
  validation figures so the test split is never used for a decision.
* Figures that need probabilities (log loss, ECE, ROC) are absent for a model without
  them (an SVM head with ``calibrate: false``); everything else is reported.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import auc, confusion_matrix, f1_score, log_loss, precision_recall_fscore_support, roc_curve

from transferlab.errors import UserError

DEFAULT_N_BOOT = 2000
DEFAULT_CI = 0.95
# Guo et al., "On Calibration of Modern Neural Networks" (ICML 2017) use 15 bins.
ECE_BINS = 15
# Caps the bootstrap index matrix (n_boot x N) so a large test split cannot exhaust
# memory; resamples are drawn in row blocks of at most this many indices.
BOOT_MAX_ELEMENTS = 1 << 22
# Binary ROC: the second class is "positive" (its probability column is the score).
POSITIVE_INDEX = 1
# Probabilities from float32 softmax may miss [0, 1] by rounding only.
PROBA_TOLERANCE = 1e-6

VAL_LOSS_KEY = "val_loss"
VAL_PREFIX = "val_"


# --------------------------------------------------------------------------- helpers


def _json_float(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _json_floats(values: np.ndarray) -> list[float | None]:
    return [_json_float(v) for v in values]


def _indices(labels: Sequence[str], index: dict[str, int], what: str) -> np.ndarray:
    # Unknown labels would otherwise vanish silently from a labels=... confusion matrix.
    unknown = sorted({str(label) for label in labels if label not in index})
    if unknown:
        raise ValueError(f"{what} contains labels not in classes: {unknown[:10]}")
    return np.fromiter((index[label] for label in labels), dtype=np.intp, count=len(labels))


def _class_index(classes: Sequence[str]) -> dict[str, int]:
    if len(classes) < 2:
        raise ValueError(f"need at least two classes, got {list(classes)}")
    index = {label: i for i, label in enumerate(classes)}
    if len(index) != len(classes):
        raise ValueError(f"classes must be unique, got {list(classes)}")
    return index


def _check_proba(proba: Any, n: int, k: int) -> np.ndarray:
    proba = np.asarray(proba, dtype=np.float64)
    if proba.shape != (n, k):
        raise ValueError(f"proba must have shape (n_samples, n_classes) = {(n, k)}, got {proba.shape}")
    if not np.all(np.isfinite(proba)):
        raise ValueError("proba contains non-finite values")
    if proba.min() < -PROBA_TOLERANCE or proba.max() > 1 + PROBA_TOLERANCE:
        raise ValueError(f"proba must lie in [0, 1], got [{proba.min()}, {proba.max()}]")
    return np.clip(proba, 0.0, 1.0)


# --------------------------------------------------------------------------- metrics


def bootstrap_ci(
    correct: np.ndarray, n_boot: int = DEFAULT_N_BOOT, seed: int = 0, ci: float = DEFAULT_CI
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``correct`` (0/1 per test image).

    Test images are resampled with replacement ``n_boot`` times from
    ``numpy.random.default_rng(seed)``; the result is deterministic for a given seed.
    """
    correct = np.asarray(correct, dtype=np.float64).ravel()
    n = correct.size
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one observation")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    rng = np.random.default_rng(seed)
    block = max(1, BOOT_MAX_ELEMENTS // n)
    means = np.concatenate([
        correct[rng.integers(0, n, size=(min(block, n_boot - start), n))].mean(axis=1)
        for start in range(0, n_boot, block)
    ])
    alpha = 1.0 - ci
    low, high = np.quantile(means, [alpha / 2, 1.0 - alpha / 2])
    return float(low), float(high)


def _confidence_bins(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    # equal-width bins ((m-1)/M, m/M]; a confidence of 0 goes to the first
    return np.clip(np.ceil(confidence * n_bins).astype(np.intp) - 1, 0, n_bins - 1)


def reliability_bins(y_true_idx: np.ndarray, proba: np.ndarray, n_bins: int = ECE_BINS) -> list[dict[str, float]]:
    """The reliability diagram of the top-1 prediction: per non-empty bin (the ECE's bins), its mean
    confidence, accuracy and image count."""
    proba = np.asarray(proba, dtype=np.float64)
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == np.asarray(y_true_idx).ravel()
    bins = _confidence_bins(confidence, n_bins)
    return [{"confidence": float(confidence[bins == b].mean()), "accuracy": float(correct[bins == b].mean()),
             "n": int((bins == b).sum())} for b in range(n_bins) if (bins == b).any()]


def expected_calibration_error(y_true_idx: np.ndarray, proba: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-1 prediction (Guo et al. 2017).

    Confidences are put in ``n_bins`` equal-width bins ``((m-1)/M, m/M]`` (a confidence
    of 0 goes to the first bin); ECE = sum_b |acc_b - conf_b| * n_b / N.
    """
    proba = np.asarray(proba, dtype=np.float64)
    y_true_idx = np.asarray(y_true_idx).ravel()
    if proba.ndim != 2 or proba.shape[0] != y_true_idx.size or y_true_idx.size == 0:
        raise ValueError(f"need proba (N, K) with N = len(y_true_idx) > 0, got {proba.shape}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y_true_idx).astype(np.float64)
    bins = _confidence_bins(confidence, n_bins)
    # |acc_b - conf_b| * n_b equals |sum of correct - sum of confidence| within bin b.
    gap = np.bincount(bins, weights=correct, minlength=n_bins) - np.bincount(bins, weights=confidence, minlength=n_bins)
    return float(np.abs(gap).sum() / y_true_idx.size)


def _per_class(t: np.ndarray, p: np.ndarray, classes: Sequence[str]) -> dict[str, dict[str, float | int]]:
    precision, recall, f1, support = precision_recall_fscore_support(
        t, p, labels=np.arange(len(classes)), zero_division=0
    )
    return {
        str(c): {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                 "support": int(support[i])}
        for i, c in enumerate(classes)
    }


def _balanced_accuracy(cm: np.ndarray) -> float:
    # Mean recall over classes present in y_true, as sklearn's balanced_accuracy_score,
    # without its warning when a prediction names a class absent from y_true.
    support = cm.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present]))


def _curve(name: str, kind: str, positive: np.ndarray, score: np.ndarray) -> dict[str, Any] | None:
    """One ROC curve, or None when it is undefined (y_true all positive or all negative)."""
    if positive.all() or not positive.any():
        return None
    fpr, tpr, thresholds = roc_curve(positive, score)
    # thresholds[0] is +inf ("nothing is positive"); JSON has no inf, so it becomes null.
    return {"name": name, "kind": kind, "auc": float(auc(fpr, tpr)), "fpr": _json_floats(fpr),
            "tpr": _json_floats(tpr), "thresholds": _json_floats(thresholds)}


def roc_curves(t: np.ndarray, proba: np.ndarray, classes: Sequence[str]) -> list[dict[str, Any]]:
    """ROC curves: the positive class's for two classes; for more, one-vs-rest per class plus averages.

    Binary: one curve, class ``classes[1]`` scored by ``proba[:, 1]``. More
    classes: each class against the rest (``kind: class``), the micro average
    (every image x class decision pooled, ``kind: micro``) and the macro
    average (per-class TPR interpolated on the union of their FPRs and
    averaged, as scikit-learn's ROC example does; ``kind: macro``). Classes
    absent from y_true (or the only class in it) have no curve.
    """
    if len(classes) == 2:
        curve = _curve(str(classes[POSITIVE_INDEX]), "class", t == POSITIVE_INDEX, proba[:, POSITIVE_INDEX])
        return [curve] if curve else []
    onehot = t[:, None] == np.arange(len(classes))[None, :]
    per_class = [_curve(str(c), "class", onehot[:, k], proba[:, k]) for k, c in enumerate(classes)]
    defined = [c for c in per_class if c is not None]
    if not defined:
        return []
    micro = _curve("micro-average", "micro", onehot.ravel(), proba.ravel())
    grid = np.unique(np.concatenate([np.asarray(c["fpr"], dtype=np.float64) for c in defined]))
    mean_tpr = np.mean([np.interp(grid, c["fpr"], c["tpr"]) for c in defined], axis=0)
    macro = {"name": "macro-average", "kind": "macro", "auc": float(np.mean([c["auc"] for c in defined])),
             "fpr": _json_floats(grid), "tpr": _json_floats(mean_tpr), "thresholds": None}
    return [*defined, *([micro] if micro else []), macro]


def _roc_auc(curves: list[dict[str, Any]], k: int) -> float | None:
    """AUC of the positive class (two classes) or the macro average of the per-class AUCs."""
    if not curves:
        return None
    wanted = "class" if k == 2 else "macro"
    return next(float(c["auc"]) for c in curves if c["kind"] == wanted)


def evaluate_predictions(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    classes: Sequence[str],
    proba: np.ndarray | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    ci: float = DEFAULT_CI,
    n_bins: int = ECE_BINS,
) -> dict[str, Any]:
    """Score predictions on a test split; returns a JSON-serializable dict.

    Keys: ``n``, ``accuracy``, ``accuracy_ci`` ([low, high], percentile bootstrap over
    test images), ``balanced_accuracy``, ``macro_f1`` (over all ``classes``; a class with
    no true and no predicted image scores 0), ``errors``, ``per_class``
    ({class: {precision, recall, f1, support}}, zero_division=0) and ``confusion``
    (rows = actual, columns = predicted, both in ``classes`` order).

    With ``proba`` (N x K, columns in ``classes`` order) also ``log_loss``, ``ece``
    (``n_bins`` bins), ``roc`` (the curves of :func:`roc_curves`: for two classes the
    positive class ``classes[1]`` scored by ``proba[:, 1]``; for more, one-vs-rest
    per class plus micro and macro averages) and ``roc_auc`` (the positive class's,
    or the macro average), and a ``roc_auc`` per class in ``per_class``. The first
    threshold (+inf in scikit-learn) is written as ``null``. When y_true holds a
    single class, ROC is undefined: ``roc`` is empty and ``roc_auc`` is ``None``.

    Deterministic for a given ``seed``.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true and y_pred differ in length: {len(y_true)} vs {len(y_pred)}")
    if len(y_true) == 0:
        raise ValueError("no predictions to evaluate")
    index = _class_index(classes)
    t = _indices(y_true, index, "y_true")
    p = _indices(y_pred, index, "y_pred")
    k = len(classes)
    correct = t == p
    cm = confusion_matrix(t, p, labels=np.arange(k))
    low, high = bootstrap_ci(correct, n_boot=n_boot, seed=seed, ci=ci)
    result: dict[str, Any] = {
        "n": int(t.size),
        "accuracy": float(correct.mean()),
        "accuracy_ci": [low, high],
        "balanced_accuracy": _balanced_accuracy(cm),
        "macro_f1": float(f1_score(t, p, labels=np.arange(k), average="macro", zero_division=0)),
        "errors": int((~correct).sum()),
        "per_class": _per_class(t, p, classes),
        "confusion": cm.astype(int).tolist(),
    }
    if proba is None:
        return result
    proba = _check_proba(proba, t.size, k)
    # Integer labels keep the columns in `classes` order (string labels would be sorted).
    result["log_loss"] = float(log_loss(t, proba, labels=np.arange(k)))
    result["ece"] = expected_calibration_error(t, proba, n_bins)
    result["roc"] = roc_curves(t, proba, classes)
    result["roc_auc"] = _roc_auc(result["roc"], k)
    aucs = {c["name"]: c["auc"] for c in result["roc"] if c["kind"] == "class"}
    for label, figures in result["per_class"].items():
        figures["roc_auc"] = aucs.get(label) if k > 2 else None
    return result


# --------------------------------------------------------------------------- champion


class SelectionError(UserError, ValueError):
    """No model has the validation figure the champion is to be chosen by."""


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


def select_best(results: list[dict], key: str = "val_accuracy", *, maximize: bool = True,
                setting: str = "key") -> dict:
    """The champion by a VALIDATION figure ``key``; never pass a test figure.

    Choosing on test accuracy would leak the test split into the decision and bias the
    reported test score upwards, so ``key`` must start with ``val_``. A result without
    a finite ``key`` (an uncalibrated SVM has no ``val_loss``) cannot win: it ranks
    after every result that has one; when none has it, :class:`SelectionError` names
    ``setting`` (the params key that chose ``key``, e.g. ``evaluate.select_by``).
    Ties go to the lower ``val_loss`` (missing counts as worst), then to the smaller
    model name, so the choice is deterministic. ``maximize=False`` is for
    lower-is-better keys such as ``val_loss``.
    """
    if not results:
        raise ValueError("no results to select from")
    if not key.startswith(VAL_PREFIX):
        raise ValueError(f"select on a validation figure ({VAL_PREFIX}*), got {key!r}")
    if not any(_finite(r.get(key)) for r in results):
        why = " (a model without probabilities, e.g. an SVM head with calibrate: false, has none)" \
            if key == VAL_LOSS_KEY else ""
        raise SelectionError(f"{setting}: got {key!r}, but no model has a finite {key}{why}; "
                             f"models: {sorted(str(r.get('model', '?')) for r in results)}")

    def order(result: dict) -> tuple[bool, float, float, str]:
        value, loss = result.get(key), result.get(VAL_LOSS_KEY)
        missing = not _finite(value)
        value = 0.0 if missing else float(value)
        loss = float(loss) if _finite(loss) else math.inf
        return (missing, -value if maximize else value, loss, str(result.get("model", "")))

    return min(results, key=order)
