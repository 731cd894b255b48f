"""Likely label errors: confident learning on out-of-fold probabilities of the pooled vectors.

A logistic regression on standardized pooled vectors gives every image of train
and val a probability per class from a model that never saw it (stratified
``audit.label_issues.cv``-fold cross-validation). cleanlab's
``find_label_issues`` (Northcutt et al., confident learning) flags the images
whose given label is unlikely under those probabilities, beyond what each
class's own confidence threshold explains, and ranks them by self-confidence
(the probability of the given label), lowest first. Test images are left out:
they are never used to choose anything.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from transferlab.config import LabelIssueParams

MAX_ITER = 2000


def out_of_fold_proba(X: np.ndarray, y_idx: np.ndarray, params: LabelIssueParams) -> tuple[np.ndarray, int]:
    """Out-of-fold class probabilities ``(N, K)`` and the folds used (``cv``, at most the smallest class)."""
    folds = min(params.cv, int(np.bincount(y_idx).min()))
    model = make_pipeline(StandardScaler(), LogisticRegression(C=params.C, max_iter=MAX_ITER))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=params.seed)
    return cross_val_predict(model, X, y_idx, cv=splitter, method="predict_proba"), folds


def label_suspects(X: np.ndarray, labels: np.ndarray, ids: list[str], parts: list[str],
                   params: LabelIssueParams) -> dict[str, Any]:
    """The ranked suspects (at most ``params.top``), how many cleanlab flagged, and the folds used.

    Each suspect: ``rank``, ``path``, ``part``, ``label`` (given), ``suggested``
    (the most probable class), ``p_label`` and ``p_suggested``. Fewer than 2
    images in some class: no cross-validation is possible and nothing is ranked.
    """
    from cleanlab.filter import find_label_issues  # imports pandas and its own helpers: only here

    classes, y_idx = np.unique(np.asarray(labels), return_inverse=True)
    counts = np.bincount(y_idx, minlength=len(classes))
    if len(classes) < 2 or counts.min() < 2:
        return {"suspects": [], "flagged": 0, "folds": 0,
                "skipped": "needs 2 classes with 2 or more train + val images each"}
    proba, folds = out_of_fold_proba(np.asarray(X, dtype=np.float64), y_idx, params)
    ranked = find_label_issues(labels=y_idx, pred_probs=proba, return_indices_ranked_by="self_confidence")
    suspects = []
    for rank, i in enumerate(ranked[: params.top], start=1):
        best = int(proba[i].argmax())
        suspects.append({
            "rank": rank, "path": ids[i], "part": parts[i], "label": str(classes[y_idx[i]]),
            "suggested": str(classes[best]), "p_label": round(float(proba[i, y_idx[i]]), 4),
            "p_suggested": round(float(proba[i, best]), 4),
        })
    return {"suspects": suspects, "flagged": int(len(ranked)), "folds": folds}
