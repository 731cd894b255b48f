"""The kNN head: cosine k-nearest neighbours on the pooled vectors (a head added as README says).

Its params model and its registration live here; the estimator
(:class:`~transferlab.models.heads.knn.estimator.KnnHead`) is declared by name
and imported on first use, so validating params.yaml (preflight) still imports
neither scikit-learn nor torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from transferlab.config import Section
from transferlab.models.heads.registry import register_head

__all__ = ["KnnHeadParams"]


class KnnHeadParams(Section):
    """Cosine k-nearest neighbours on pooled vectors; probabilities are smoothed neighbour votes."""

    k: int = Field(10, ge=1)  # neighbours that vote (at most the training images)
    weights: Literal["uniform", "distance"] = "distance"  # distance: a vote weighs 1 / cosine distance
    smoothing: float = Field(0.5, ge=0)  # votes added to every class (in neighbours): finite log loss


register_head("knn", params=KnnHeadParams, reads="pooled", estimator="transferlab.models.heads.knn.estimator:KnnHead")
