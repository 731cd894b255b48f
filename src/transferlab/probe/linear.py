"""A linear probe per block: logistic regression on standardized pooled vectors, scored on val.

C is chosen among ``probe.C_grid`` by stratified cross-validation on train
(scikit-learn's ``LogisticRegressionCV``, accuracy); the val accuracy gets a
percentile bootstrap interval from the same function evaluate uses.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from transferlab.config import ProbeParams
from transferlab.errors import UserError
from transferlab.evaluation.metrics import bootstrap_ci


# lbfgs's gradient tolerance: scikit-learn's 1e-4 took 2-4x the iterations for the same chosen C and CV
# accuracy (to 0.001) on 1259 x 1280 vectors of 10 classes
TOL = 1e-3
# One BLAS thread per fit: these matrices are small, and on 2 shared cores OpenBLAS's threads (two
# libraries of them, plus OpenMP) made a block's fits 3-20x slower than one thread did.
BLAS_THREADS = 1


class ProbeError(UserError):
    """The split cannot be probed (too few images in a class, no val images)."""


def folds(train_labels: np.ndarray, params: ProbeParams) -> int:
    """``probe.cv`` folds; each class needs at least that many train images."""
    labels, counts = np.unique(train_labels, return_counts=True)
    if len(labels) < 2:
        raise ProbeError(f"probe: the train split has {len(labels)} class; a probe needs at least two")
    fewest = int(counts.min())
    if params.cv > fewest:
        label = labels[int(counts.argmin())]
        raise ProbeError(f"probe.cv: got {params.cv}; allowed: 2 to {fewest}, the train images of the smallest "
                         f"class ({label!r}): stratified folds need one image of each class")
    return params.cv


def probe_block(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                params: ProbeParams) -> dict[str, Any]:
    """Fit on train (C by CV), score on val: accuracy, its interval, C and the CV accuracy."""
    if len(val_y) == 0:
        raise ProbeError("probe: the val split is empty; the probe scores each block on val (split.ratios.val)")
    scaler = StandardScaler().fit(train_x)
    cv = StratifiedKFold(folds(train_y, params), shuffle=True, random_state=params.seed)
    # l1_ratios (0,): plain L2; the new attributes: C_ a float, scores_ (folds, l1_ratios, Cs)
    model = LogisticRegressionCV(Cs=list(params.C_grid), cv=cv, max_iter=params.max_iter, scoring="accuracy",
                                 l1_ratios=(0.0,), use_legacy_attributes=False, tol=TOL)
    with warnings.catch_warnings(), threadpool_limits(BLAS_THREADS):
        warnings.simplefilter("ignore", ConvergenceWarning)  # a small C grid point may stop early; CV judges it
        model.fit(scaler.transform(train_x), train_y)
    correct = model.predict(scaler.transform(val_x)) == val_y
    low, high = bootstrap_ci(correct, params.n_boot, params.seed, params.ci)
    return {
        "channels": int(train_x.shape[1]),
        "val_accuracy": float(correct.mean()),
        "val_correct": int(correct.sum()),
        "val_n": int(correct.size),
        "ci_low": low,
        "ci_high": high,
        "C": float(model.C_),
        "cv_accuracy": float(np.asarray(model.scores_).mean(axis=0).max()),
    }


def probe_curve(blocks: Sequence[str], train: Sequence[np.ndarray], train_y: np.ndarray,
                val: Sequence[np.ndarray], val_y: np.ndarray, params: ProbeParams) -> list[dict[str, Any]]:
    """One probe per block, input to output."""
    return [{"block": name, "index": i, **probe_block(tx, train_y, vx, val_y, params)}
            for i, (name, tx, vx) in enumerate(zip(blocks, train, val, strict=True))]
