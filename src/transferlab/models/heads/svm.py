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
# the sigmoid CalibratedClassifierCV fits per score; private, so a test pins our
# probabilities to CalibratedClassifierCV(ensemble=False)'s on the same folds
from sklearn.calibration import _SigmoidCalibration
from sklearn.model_selection import StratifiedKFold
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


def _platt_params(decision: NDArray[np.float64], y_idx: NDArray[np.int64], n_classes: int) -> NDArray[np.float64]:
    """One sigmoid ``(a, b)`` per one-vs-rest score, fitted on out-of-fold decisions (sklearn's Platt fit)."""
    scores = decision.reshape(len(decision), -1)
    positives = [1] if n_classes == 2 else range(n_classes)  # binary: one score, for the second class
    fitted = [_SigmoidCalibration().fit(scores[:, k], (y_idx == c).astype(np.float64))
              for k, c in enumerate(positives)]
    return np.array([[c.a_, c.b_] for c in fitted], dtype=np.float64)


def _predicted(decision: NDArray[np.float64]) -> NDArray[np.int64]:
    """Label indices from decision values, as LinearSVC.predict chooses them."""
    return (decision > 0).astype(np.int64) if decision.ndim == 1 else decision.argmax(axis=1)


class _Standardized:
    """Training rows standardized, and the basis the SVM problem on them is solved in.

    liblinear's intercept is the weight of a constant feature 1 (intercept_scaling
    1), penalized like the others: appending that column makes it a plain weight.
    With fewer rows than columns (n < d + 1, the usual case for a few hundred
    images of 1280 features) every weight the dual solver can reach lies in the
    span of the rows, so the problem is solved exactly on ``L`` from the LQ
    factorization ``A = L Q`` (the QR of ``A.T``; Q has orthonormal rows): same
    Gram matrix ``L L.T = A A.T``, same dual iterates, weights ``w @ Q``, at n
    instead of d + 1 columns per coordinate step (2.5x fewer seconds on real
    Lite0 features). With more rows than columns it is solved on ``A`` itself.
    Either way by liblinear's dual coordinate descent (see :meth:`solve`).
    """

    def __init__(self, X: NDArray[Any]) -> None:
        self.scaler = StandardScaler().fit(X)
        rows = self.scaler.transform(X).astype(np.float64)
        columns = np.hstack([rows, np.ones((len(rows), 1))])
        self.reduced = len(columns) < columns.shape[1]
        if self.reduced:
            q, r = np.linalg.qr(columns.T)  # QR, not an SVD: a third of the time, and no rank needed
            self.problem, self.basis = r.T, q.T
        else:
            self.basis, self.problem = None, columns

    def solve(self, y: NDArray[np.int64], svc: LinearSVC) -> tuple[NDArray[np.float64], NDArray[np.float64], int]:
        """``svc`` (with the intercept as a column) fitted: (coef, intercept) on standardized rows, iterations."""
        # Always the dual (coordinate descent). "auto" picks the primal (Newton) once rows outnumber
        # columns; on Lite0-shaped vectors at 4,000 rows it was 2x slower over the grid (176 s against
        # about 60 s for the 12-class grid), and it would pick it for a square reduced problem too.
        svc.set_params(fit_intercept=False, dual=True)
        svc.fit(self.problem, y)
        weights = svc.coef_ if self.basis is None else svc.coef_ @ self.basis
        return weights[:, :-1], weights[:, -1], int(np.max(svc.n_iter_))


class SvmHead(ClassifierMixin, BaseEstimator):
    """``StandardScaler -> LinearSVC`` on pooled vectors ``(N, C)``.

    The pipeline feeds it pooled vectors; 4-D maps are accepted too and pooled
    here (mean over H, W), so it can read the same cache as the torch heads.

    ``C_grid``: if given, ``C`` is ignored and chosen by stratified ``cv``-fold
    cross-validation (accuracy) on the training data only; ``best_C_`` and
    ``cv_scores_`` (mean accuracy per grid value, in grid order) are recorded.
    Ties go to the earliest grid value.

    ``calibrate=True``: Platt scaling as
    ``CalibratedClassifierCV(method="sigmoid", ensemble=False)`` fits it with the
    same stratified folds: the sigmoids are fitted on out-of-fold decision values
    (those of the grid's folds at the chosen C: no extra fits) and the SVM itself
    is the one trained on all the data. Only the sigmoid
    parameters (``platt_``, one ``(a, b)`` row per one-vs-rest score) are kept,
    and ``predict_proba`` applies them with sklearn's formula; this is what lets
    the calibrated head be saved as plain arrays and loaded without refitting
    or unpickling. ``predict`` and ``decision_function`` are the SVM's whatever
    ``calibrate`` is, so ``argmax(predict_proba)`` can disagree with ``predict``
    near the boundary (as with ``SVC(probability=True)``). Without calibration
    there is no ``predict_proba`` at all (``hasattr`` is False).

    Each problem is solved in the span of its training rows when they are fewer
    than the features (:class:`_Standardized`: exact, and cheaper), with
    liblinear's ``tol`` (``train_head.svm.tol``).

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
        tol: float = _SVM.tol,
        calibrate: bool = _SVM.calibrate,
        random_state: Any = _SVM.random_state,
    ) -> None:
        self.C = C
        self.C_grid = C_grid
        self.cv = cv
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.tol = tol
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
        check(is_number(self.tol) and self.tol > 0, f"tol: got {self.tol!r}; allowed: a number > 0")
        check(
            isinstance(self.calibrate, (bool, np.bool_)),
            f"calibrate: got {self.calibrate!r}; allowed: true or false",
        )
        check_class_weight(self.class_weight)

    def _pipeline(self, C: float, seed: int) -> Pipeline:
        svc = LinearSVC(C=C, class_weight=self.class_weight, max_iter=int(self.max_iter), tol=float(self.tol),
                        random_state=seed)
        return Pipeline([("scaler", StandardScaler()), ("svc", svc)])

    def _fitted(self, C: float, seed: int, scaler: StandardScaler, coef: NDArray[np.float64],
                intercept: NDArray[np.float64]) -> Pipeline:
        """The ``scaler -> LinearSVC`` pipeline with these fitted arrays, as if it had been fitted itself."""
        model = self._pipeline(C, seed)
        model.steps[0] = ("scaler", scaler)
        svc = model["svc"]
        # setting fitted attributes is what rebuilds a pipeline from plain arrays, without pickle
        svc.coef_, svc.intercept_ = np.asarray(coef, np.float64), np.asarray(intercept, np.float64)
        svc.classes_ = np.arange(len(self.classes_))
        svc.n_features_in_ = int(self.n_features_in_)
        return model

    def _solve(self, data: _Standardized, y_idx: NDArray[np.int64], C: float, seed: int) -> tuple[Pipeline, int]:
        coef, intercept, n_iter = data.solve(y_idx, self._pipeline(C, seed)["svc"])
        return self._fitted(C, seed, data.scaler, coef, intercept), n_iter

    def _vectors(self, X: ArrayLike, reset: bool) -> NDArray[Any]:
        return pool(validate_data(self, X, reset=reset, allow_nd=True, dtype=FLOAT_DTYPES))

    def fit(self, X: ArrayLike, y: ArrayLike) -> "SvmHead":
        self._check_params()
        X, y = validate_data(self, X, y, allow_nd=True, dtype=FLOAT_DTYPES)
        X = pool(X)
        self.classes_, y_idx = encode_labels(y)
        seed = seed_from(self.random_state)
        grid = [float(self.C)] if self.C_grid is None else [float(c) for c in self.C_grid]
        out_of_fold, scores = None, None
        if self.C_grid is not None or self.calibrate:
            folds = StratifiedKFold(n_splits=int(self.cv), shuffle=True, random_state=seed)
            out_of_fold, scores = self._cross_validate(X, y_idx, grid, folds, seed)
        best = 0 if self.C_grid is None else int(np.argmax(scores))  # ties: the earliest
        self.best_C_, self.cv_scores_ = grid[best], None if self.C_grid is None else scores
        self.model_, self.n_iter_ = self._solve(_Standardized(X), y_idx, self.best_C_, seed)
        if self.calibrate:
            self.platt_ = _platt_params(out_of_fold[best], y_idx, len(self.classes_))
        self._count_params()
        return self

    def _cross_validate(
        self, X: NDArray[Any], y_idx: NDArray[np.int64], grid: list[float], folds: StratifiedKFold, seed: int
    ) -> tuple[list[NDArray[np.float64]], NDArray[np.float64]]:
        """Out-of-fold decision values per grid value, and its mean fold accuracy (``cross_val_score``'s).

        Each fold is standardized and factored once for the whole grid. The
        decisions at the chosen C are what Platt scaling fits on, as
        ``CalibratedClassifierCV(ensemble=False)`` would with the same folds,
        so calibration costs no further fits.
        """
        shape = (len(X),) if len(self.classes_) == 2 else (len(X), len(self.classes_))
        decisions = [np.empty(shape) for _ in grid]
        accuracy = np.empty((len(grid), folds.get_n_splits()))
        for f, (train, held_out) in enumerate(folds.split(X, y_idx)):
            data = _Standardized(X[train])
            for g, C in enumerate(grid):
                model, _ = self._solve(data, y_idx[train], C, seed)
                decisions[g][held_out] = model.decision_function(X[held_out])
                accuracy[g, f] = np.mean(_predicted(decisions[g][held_out]) == y_idx[held_out])
        return decisions, accuracy.mean(axis=1)

    def decision_function(self, X: ArrayLike) -> NDArray[np.float64]:
        check_is_fitted(self)
        return self.model_.decision_function(self._vectors(X, reset=False))

    def predict(self, X: ArrayLike) -> NDArray[Any]:
        decision = self.decision_function(X)  # first: it raises NotFittedError before classes_ is read
        return self.classes_[_predicted(decision)]

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
        scaler = StandardScaler()
        scaler.mean_, scaler.scale_ = arrays["scaler.mean"], arrays["scaler.scale"]
        scaler.var_ = scaler.scale_**2
        scaler.n_features_in_ = self.n_features_in_
        self.model_ = self._fitted(self.best_C_, seed_from(self.random_state), scaler,
                                   arrays["svc.coef"], arrays["svc.intercept"])
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
