"""The kNN head's estimator: cosine k-nearest neighbours on the pooled vectors.

Nothing to learn but the training vectors themselves, so it trains in a moment
and needs no val split to stop on: the head for a handful of images per class,
where the other heads have too little to fit. Params: ``train_head.knn``
(:class:`~transferlab.models.heads.knn.KnnHeadParams`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.preprocessing import normalize
from sklearn.utils.validation import check_is_fitted, validate_data

from transferlab.models.heads.common import FLOAT_DTYPES, check, check_int, encode_labels, is_number, pool
from transferlab.models.heads.persistence import head_meta, load_arrays, save_arrays
from transferlab.models.heads.knn import KnnHeadParams

__all__ = ["KnnHead"]

WEIGHTS = ("uniform", "distance")
EPS = 1e-6  # cosine distance floor for "distance" weights: an exact copy must not divide by zero
ROWS_PER_BLOCK = 1024  # query rows per similarity block: bounded memory at any training size


_KNN = KnnHeadParams()


def _unit_rows(X: NDArray[Any]) -> NDArray[np.float32]:
    """Rows scaled to unit L2 norm in float32 (an all-zero row stays zero): dot products are then cosines."""
    return normalize(np.asarray(X, dtype=np.float32))


class KnnHead(ClassifierMixin, BaseEstimator):
    """Cosine kNN on pooled vectors ``(N, C)`` (4-D maps are pooled first).

    ``predict_proba``: the ``k`` most cosine-similar training vectors vote for
    their label, each with weight 1 (``uniform``) or ``1 / (1 - cos)``
    (``distance``, normalised so the k votes sum to ``k``); ``smoothing`` votes
    are added to every class, then rows are normalised. ``predict`` is its
    argmax (ties: the first class). Neighbour ties go to the earlier training row.

    Fitted attributes: ``classes_``, ``n_features_in_``, ``vectors_`` (unit
    training rows, float32), ``labels_`` (their class indices), ``n_params_`` (0).
    """

    def __init__(self, k: int = _KNN.k, weights: str = _KNN.weights, smoothing: float = _KNN.smoothing) -> None:
        self.k = k
        self.weights = weights
        self.smoothing = smoothing

    def _check_params(self) -> None:
        check_int("k", self.k, 1)
        check(self.weights in WEIGHTS, f"weights: got {self.weights!r}; allowed: {', '.join(WEIGHTS)}")
        check(is_number(self.smoothing) and self.smoothing >= 0,
              f"smoothing: got {self.smoothing!r}; allowed: a number >= 0")

    def fit(self, X: ArrayLike, y: ArrayLike) -> "KnnHead":
        self._check_params()
        X, y = validate_data(self, X, y, allow_nd=True, dtype=FLOAT_DTYPES)
        self.classes_, self.labels_ = encode_labels(y)
        self.vectors_ = _unit_rows(pool(X))
        self.n_params_ = 0
        return self

    def neighbours(self, X: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """Indices of the ``k`` nearest training rows of each row of ``X`` and their cosine similarities."""
        check_is_fitted(self, "vectors_")
        X = _unit_rows(pool(validate_data(self, X, reset=False, allow_nd=True, dtype=FLOAT_DTYPES)))
        k = min(int(self.k), len(self.vectors_))
        index, similarity = [], []
        for start in range(0, len(X), ROWS_PER_BLOCK):
            sims = X[start:start + ROWS_PER_BLOCK] @ self.vectors_.T
            # stable sort of -sims: equal similarities keep training order, so results never depend on a tie-break
            top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            index.append(top)
            similarity.append(np.take_along_axis(sims, top, axis=1))
        return np.concatenate(index).astype(np.int64), np.concatenate(similarity)

    def predict_proba(self, X: ArrayLike) -> NDArray[np.float64]:
        index, similarity = self.neighbours(X)
        if self.weights == "distance":
            votes = 1.0 / np.maximum(1.0 - similarity.astype(np.float64), EPS)
            votes *= index.shape[1] / votes.sum(axis=1, keepdims=True)
        else:
            votes = np.ones(index.shape, dtype=np.float64)
        scores = np.full((len(index), len(self.classes_)), float(self.smoothing))
        rows = np.repeat(np.arange(len(index)), index.shape[1])
        np.add.at(scores, (rows, self.labels_[index].ravel()), votes.ravel())
        return scores / scores.sum(axis=1, keepdims=True)

    def predict(self, X: ArrayLike) -> NDArray[Any]:
        proba = self.predict_proba(X)  # first: it raises NotFittedError before classes_ is read
        return self.classes_[proba.argmax(axis=1)]

    # ------------------------------------------------------------- persistence

    def save(self, path: str | Path) -> None:
        """The unit training vectors and their label indices (safetensors) and ``<path>.json``."""
        check_is_fitted(self, "vectors_")
        arrays = {"vectors": np.ascontiguousarray(self.vectors_, np.float32), "labels": self.labels_.astype(np.int64)}
        save_arrays(path, arrays, head_meta(self, n_features_in=int(self.n_features_in_)))

    def _restore(self, meta: Mapping[str, Any], path: Path) -> None:
        arrays = load_arrays(path)
        self.classes_ = np.asarray(meta["classes"])
        self.n_features_in_ = int(meta["n_features_in"])
        self.vectors_, self.labels_ = arrays["vectors"], arrays["labels"]
        self.n_params_ = 0
