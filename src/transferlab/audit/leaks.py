"""Likely leaks: a held-out image whose pooled vector is nearly that of an image of a part trained on.

Parts are ordered train < val < test. For every image of val and test, the most
cosine-similar image of each less held-out part is found; a pair at or above
the threshold is a likely leak (the same photo or scene, resized, recompressed,
cropped or shot a second later). One pair per held-out image and earlier part,
so the list is bounded by the held-out images however alike the data is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from sklearn.preprocessing import normalize

from transferlab.models.features import PartFeatures

ORDER = ("train", "val", "test")
ROWS_PER_BLOCK = 1024  # held-out rows per similarity block: bounded memory


def unit_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm in float32 (an all-zero row stays zero): dot products are then cosines."""
    return normalize(np.asarray(X, dtype=np.float32))


def nearest(queries: np.ndarray, pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index and cosine similarity of each query row's most similar pool row (ties: the first)."""
    q, p = unit_rows(queries), unit_rows(pool)
    index, similarity = [], []
    for start in range(0, len(q), ROWS_PER_BLOCK):
        sims = q[start:start + ROWS_PER_BLOCK] @ p.T
        best = sims.argmax(axis=1)
        index.append(best)
        similarity.append(sims[np.arange(len(best)), best])
    if not index:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    return np.concatenate(index), np.concatenate(similarity)


def find_leaks(parts: Mapping[str, PartFeatures], threshold: float) -> list[dict[str, Any]]:
    """Pairs across parts at or above ``threshold``, most similar first.

    Each pair: ``path``/``part``/``label`` of the held-out image, ``match``/
    ``match_part``/``match_label`` of its most similar image in an earlier
    part, and ``similarity`` (rounded to 4 decimals).
    """
    leaks = []
    present = [p for p in ORDER if p in parts and len(parts[p].ids)]
    for i, held_out in enumerate(present):
        for earlier in present[:i]:
            queries, pool = parts[held_out], parts[earlier]
            index, similarity = nearest(queries.pooled, pool.pooled)
            for q in np.flatnonzero(similarity >= threshold):
                m = int(index[q])
                leaks.append({
                    "path": queries.ids[q], "part": held_out, "label": str(queries.labels[q]),
                    "match": pool.ids[m], "match_part": earlier, "match_label": str(pool.labels[m]),
                    "similarity": round(float(similarity[q]), 4),
                })
    return sorted(leaks, key=lambda r: (-r["similarity"], r["path"], r["match"]))


def leaked(leaks: list[dict[str, Any]], part: str) -> list[str]:
    """The images of ``part`` that are the held-out side of a leak, sorted."""
    return sorted({r["path"] for r in leaks if r["part"] == part})
