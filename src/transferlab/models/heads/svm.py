"""The SVM head: ``StandardScaler -> LinearSVC`` on pooled vectors, optionally Platt-calibrated.

Default params are ``train_head.svm``'s (:class:`transferlab.config.SvmHeadParams`);
input conventions are those of :mod:`transferlab.models.heads.common`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import Tensor

from transferlab.config import SvmHeadParams
from transferlab.models.heads.common import (
    FLOAT_DTYPES, check, check_class_weight, check_int, encode_labels, is_number, pool, seed_from,
)
from transferlab.models.heads.persistence import head_meta, load_arrays, plain, save_arrays

__all__ = ["SvmHead", "linear_from_svm"]

_SVM = SvmHeadParams()
# a tuple: scikit-learn wants immutable defaults (a list from params.yaml is as good)
_C_GRID = None if _SVM.C_grid is None else tuple(_SVM.C_grid)



def _platt_proba(
    decision: NDArray[np.float64], platt: NDArray[np.float64], n_classes: int
) -> NDArray[np.float64]:
    """Sigmoid-calibrated probabilities, as sklearn's CalibratedClassifierCV computes them.

    One sigmoid ``1 / (1 + exp(a*d + b))`` per one-vs-rest score; binary gives
    the positive class and its complement, multiclass is normalized to sum 1.
    """
    scores = decision.reshape(len(decision), -1)
    calibrated = expit(-(platt[:, 0] * scores + platt[:, 1]))
    if n_classes == 2:
        return np.column_stack([1.0 - calibrated[:, 0], calibrated[:, 0]])
    total = calibrated.sum(axis=1, keepdims=True)
    uniform = np.full_like(calibrated, 1.0 / n_classes)
    return np.divide(calibrated, total, out=uniform, where=total != 0)


class SvmHead(ClassifierMixin, BaseEstimator):
    """``StandardScaler -> LinearSVC`` on pooled vectors ``(N, C)``.

    The pipeline feeds it pooled vectors; 4-D maps are accepted too and pooled
    here (mean over H, W), so it can read the same cache as the torch heads.

    ``C_grid``: if given, ``C`` is ignored and chosen by stratified ``cv``-fold
    cross-validation (accuracy) on the training data only; ``best_C_`` and
    ``cv_scores_`` (mean accuracy per grid value, in grid order) are recorded.
    Ties go to the earliest grid value.

    ``calibrate=True``: Platt scaling fitted by
    ``CalibratedClassifierCV(method="sigmoid", ensemble=False)`` with the same
    stratified folds: the sigmoids are fitted on out-of-fold decision values
    and the SVM itself is the one trained on all the data. Only the sigmoid
    parameters (``platt_``, one ``(a, b)`` row per one-vs-rest score) are kept,
    and ``predict_proba`` applies them with sklearn's formula; this is what lets
    the calibrated head be saved as plain arrays and loaded without refitting
    or unpickling. ``predict`` and ``decision_function`` are the SVM's whatever
    ``calibrate`` is, so ``argmax(predict_proba)`` can disagree with ``predict``
    near the boundary (as with ``SVC(probability=True)``). Without calibration
    there is no ``predict_proba`` at all (``hasattr`` is False).

    Fitted attributes: ``classes_``, ``n_features_in_`` (C), ``model_`` (the
    fitted scaler + LinearSVC pipeline, on label indices), ``best_C_``,
    ``cv_scores_`` (None without ``C_grid``), ``platt_`` (only if calibrated),
    ``n_iter_`` and ``n_params_`` (coefficients and intercepts).
    """

    def __init__(
        self,
        C: float = _SVM.C,
        C_grid: Sequence[float] | None = _C_GRID,
        cv: int = _SVM.cv,
        class_weight: str | None = _SVM.class_weight,
        max_iter: int = _SVM.max_iter,
        calibrate: bool = _SVM.calibrate,
        random_state: Any = _SVM.random_state,
    ) -> None:
        self.C = C
        self.C_grid = C_grid
        self.cv = cv
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.calibrate = calibrate
        self.random_state = random_state

    def _check_params(self) -> None:
        check(is_number(self.C) and self.C > 0, f"C: got {self.C!r}; allowed: a number > 0")
        grid = self.C_grid
        positive_list = isinstance(grid, (list, tuple)) and len(grid) > 0
        positive_list = positive_list and all(is_number(c) and c > 0 for c in grid)
        check(
            grid is None or positive_list,
            f"C_grid: got {grid!r}; allowed: null or a non-empty list of numbers > 0",
        )
        check_int("cv", self.cv, 2)
        check_int("max_iter", self.max_iter, 1)
        check(
            isinstance(self.calibrate, (bool, np.bool_)),
            f"calibrate: got {self.calibrate!r}; allowed: true or false",
        )
        check_class_weight(self.class_weight)

    def _pipeline(self, C: float, seed: int) -> Pipeline:
        svc = LinearSVC(C=C, class_weight=self.class_weight, max_iter=int(self.max_iter), random_state=seed)
        return Pipeline([("scaler", StandardScaler()), ("svc", svc)])

    def _vectors(self, X: ArrayLike, reset: bool) -> NDArray[Any]:
        return pool(validate_data(self, X, reset=reset, allow_nd=True, dtype=FLOAT_DTYPES))

    def fit(self, X: ArrayLike, y: ArrayLike) -> "SvmHead":
        self._check_params()
        X, y = validate_data(self, X, y, allow_nd=True, dtype=FLOAT_DTYPES)
        X = pool(X)
        self.classes_, y_idx = encode_labels(y)
        seed = seed_from(self.random_state)
        folds = StratifiedKFold(n_splits=int(self.cv), shuffle=True, random_state=seed)
        self.best_C_, self.cv_scores_ = self._choose_C(X, y_idx, folds, seed)
        pipeline = self._pipeline(self.best_C_, seed)
        if self.calibrate:
            calibrated = CalibratedClassifierCV(pipeline, method="sigmoid", cv=folds, ensemble=False)
            (pair,) = calibrated.fit(X, y_idx).calibrated_classifiers_
            self.model_ = pair.estimator
            self.platt_ = np.array([[c.a_, c.b_] for c in pair.calibrators], dtype=np.float64)
        else:
            self.model_ = pipeline.fit(X, y_idx)
        self.n_iter_ = int(self.model_["svc"].n_iter_)
        self._count_params()
        return self

    def _choose_C(
        self, X: NDArray[Any], y_idx: NDArray[np.int64], folds: StratifiedKFold, seed: int
    ) -> tuple[float, NDArray[np.float64] | None]:
        if self.C_grid is None:
            return float(self.C), None
        grid = [float(c) for c in self.C_grid]
        scores = [cross_val_score(self._pipeline(c, seed), X, y_idx, cv=folds).mean() for c in grid]
        return grid[int(np.argmax(scores))], np.asarray(scores)

    def decision_function(self, X: ArrayLike) -> NDArray[np.float64]:
        check_is_fitted(self)
        return self.model_.decision_function(self._vectors(X, reset=False))

    def predict(self, X: ArrayLike) -> NDArray[Any]:
        decision = self.decision_function(X)
        idx = (decision > 0).astype(np.int64) if decision.ndim == 1 else decision.argmax(axis=1)
        return self.classes_[idx]

    def _has_proba(self) -> bool:
        return bool(self.calibrate)

    @available_if(_has_proba)
    def predict_proba(self, X: ArrayLike) -> NDArray[np.float64]:
        """Platt-calibrated probabilities; only exists when ``calibrate=True``."""
        check_is_fitted(self, "platt_")
        return _platt_proba(self.decision_function(X), self.platt_, len(self.classes_))

    # ------------------------------------------------------------- persistence

    def save(self, path: str | Path) -> None:
        """Write scaler/SVM/sigmoid arrays to ``path`` (safetensors) and metadata to ``<path>.json``."""
        check_is_fitted(self)
        scaler, svc = self.model_["scaler"], self.model_["svc"]
        arrays = {
            "scaler.mean": scaler.mean_,
            "scaler.scale": scaler.scale_,
            "svc.coef": svc.coef_,
            "svc.intercept": svc.intercept_,
        }
        if hasattr(self, "platt_"):
            arrays["platt"] = self.platt_
        arrays = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()}
        cv_scores = None if self.cv_scores_ is None else plain(self.cv_scores_)
        meta = head_meta(self, n_features_in=int(self.n_features_in_), best_C=float(self.best_C_),
                         n_iter=self.n_iter_, cv_scores=cv_scores)
        save_arrays(path, arrays, meta)

    def _restore(self, meta: Mapping[str, Any], path: Path) -> None:
        arrays = load_arrays(path)
        self.classes_ = np.asarray(meta["classes"])
        self.n_features_in_ = int(meta["n_features_in"])
        self.best_C_ = float(meta["best_C"])
        self.n_iter_ = int(meta["n_iter"])
        scores = meta["cv_scores"]
        self.cv_scores_ = None if scores is None else np.asarray(scores, dtype=np.float64)
        self.model_ = self._pipeline(self.best_C_, seed_from(self.random_state))
        # Setting fitted attributes directly rebuilds the exact fitted pipeline
        # from plain arrays, which is what avoids pickle.
        scaler, svc = self.model_["scaler"], self.model_["svc"]
        scaler.mean_, scaler.scale_ = arrays["scaler.mean"], arrays["scaler.scale"]
        scaler.var_ = scaler.scale_**2
        svc.coef_, svc.intercept_ = arrays["svc.coef"], arrays["svc.intercept"]
        svc.classes_ = np.arange(len(self.classes_))
        scaler.n_features_in_ = svc.n_features_in_ = self.n_features_in_
        if "platt" in arrays:
            self.platt_ = arrays["platt"]
        self._count_params()

    def _count_params(self) -> None:
        svc = self.model_["svc"]
        self.n_params_ = int(svc.coef_.size + svc.intercept_.size)


def linear_from_svm(head: SvmHead) -> tuple[Tensor, Tensor]:
    """The svm spec's warm start: standardise -> LinearSVC as one linear map on pooled features.

    The scaler folds into the linear map, ``w' = coef / scale`` and
    ``b' = intercept - coef @ (mean / scale)``. Multiclass: logits equal
    ``decision_function``. Binary: logits ``[-s/2, s/2]`` for the decision
    value ``s``, so their difference is ``s``, their softmax is ``sigmoid(s)``
    and the argmax agrees with ``predict``.
    """
    scaler, svc = head.model_["scaler"], head.model_["svc"]
    coef = np.asarray(svc.coef_, dtype=np.float64)
    weight = coef / scaler.scale_
    bias = np.asarray(svc.intercept_, dtype=np.float64) - coef @ (scaler.mean_ / scaler.scale_)
    if weight.shape[0] == 1:
        weight, bias = np.concatenate([-weight, weight]) / 2, np.concatenate([-bias, bias]) / 2
    return torch.from_numpy(weight.astype(np.float32)), torch.from_numpy(bias.astype(np.float32))
