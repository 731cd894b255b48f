"""Stratified train/val/test split that respects folders and duplicates.

Rules
- With ``respect_folders`` and a dataset that has its own ``train``/``val``/
  ``test`` folders, each image keeps its folder's part, renamed through
  ``folders`` (e.g. ``{val: test}`` to hold a dataset's ``val`` folder out as
  the test split). Parts the folders do not provide are drawn from ``train``,
  stratified, in proportion to ``ratios``.
- Otherwise every image is drawn, stratified, in proportion to ``ratios``.
- Duplicates always land in the same part: the manifest's ``group`` (exact
  duplicates, same sha256 of the original bytes, and near-duplicates found by
  ingest's perceptual hashes); a manifest without it groups by sha256. A group
  that spans folders goes to its most held-out part, so no copy of a test
  image is ever trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from transferlab.config import PARTS, SplitParams
from transferlab.errors import UserError
from transferlab.io import atomic_path

HELD_OUT_ORDER = {"train": 0, "val": 1, "test": 2}
HELD_OUT_PARTS = ("val", "test")
SPLIT_COLUMNS = ["path", "label", "part", "sha256"]


class SplitError(UserError, ValueError):
    """The manifest cannot be split as asked."""


GROUP = "group"  # the manifest column of duplicate groups (ingest); absent in older manifests: sha256


@dataclass(frozen=True)
class _Unit:
    """A group of duplicates (exact or near), moved as one."""

    key: str  # the group id
    label: str
    part: str  # "" when it is still to be drawn


def _group_key(manifest: pd.DataFrame) -> str:
    return GROUP if GROUP in manifest.columns else "sha256"


def _units(manifest: pd.DataFrame, params: SplitParams) -> list[_Unit]:
    units = []
    for key, group in manifest.groupby(_group_key(manifest), sort=True):
        parts = [params.folders.get(f, f) for f in group["folder_split"] if f] if params.respect_folders else []
        unknown = sorted(set(parts) - set(PARTS))
        if unknown:
            raise SplitError(f"split.folders maps to unknown part(s) {unknown}; allowed: {', '.join(PARTS)}")
        part = max(parts, key=HELD_OUT_ORDER.__getitem__) if parts else ""
        units.append(_Unit(str(key), str(group["label"].iloc[0]), part))
    return units


def _counts(n: int, ratios: dict[str, float], parts: list[str]) -> dict[str, int]:
    """Largest-remainder allocation of n items to parts, >= 1 for held-out parts when possible."""
    total = sum(ratios[p] for p in parts)
    exact = {p: n * ratios[p] / total for p in parts}
    counts = {p: int(np.floor(v)) for p, v in exact.items()}
    for p in sorted(parts, key=lambda p: exact[p] - counts[p], reverse=True)[: n - sum(counts.values())]:
        counts[p] += 1
    for p in parts:
        if p != "train" and counts[p] == 0 and ratios[p] > 0 and counts["train"] > 1:
            counts[p], counts["train"] = 1, counts["train"] - 1
    return counts


def _draw(units: list[_Unit], params: SplitParams, present: set[str]) -> dict[str, str]:
    """Assign a part to each undecided unit, stratified per label."""
    missing = [p for p in HELD_OUT_PARTS if p not in present and params.ratios[p] > 0]
    targets = ["train", *missing]
    rng = np.random.default_rng(params.seed)
    decided: dict[str, str] = {}
    pool = [u for u in units if u.part in ("", "train")]
    for label in sorted({u.label for u in pool}):
        members = sorted(u.key for u in pool if u.label == label)
        order = rng.permutation(len(members))
        counts = _counts(len(members), params.ratios, targets)
        cursor = 0
        for part in reversed(targets):  # held-out parts first, so rounding favours them
            for i in order[cursor : cursor + counts[part]]:
                decided[members[i]] = part
            cursor += counts[part]
    return decided


def assign_parts(manifest: pd.DataFrame, params: SplitParams) -> pd.DataFrame:
    """Return ``path, label, part, sha256`` for every manifest row, sorted by path."""
    if manifest.empty:
        raise SplitError("the manifest is empty: nothing to split")
    manifest = manifest.fillna({"folder_split": ""})
    units = _units(manifest, params)
    present = {u.part for u in units if u.part}
    drawn = _draw(units, params, present)
    part_of = {u.key: drawn.get(u.key, u.part) for u in units}
    out = manifest.assign(part=manifest[_group_key(manifest)].map(part_of))[SPLIT_COLUMNS]
    return out.sort_values("path", kind="stable").reset_index(drop=True)


def summarize(split: pd.DataFrame) -> dict[str, dict[str, int]]:
    """{part: {label: count}} for logging and reports."""
    table = split.groupby(["part", "label"]).size()
    return {str(p): {str(lbl): int(n) for lbl, n in table[p].items()} for p in table.index.levels[0]}


def write_split(manifest_csv: str | Path, out_csv: str | Path, params: SplitParams) -> pd.DataFrame:
    manifest = pd.read_csv(manifest_csv, dtype={"folder_split": str, "label": str}, keep_default_na=False)
    split = assign_parts(manifest, params)
    with atomic_path(out_csv, suffix=".csv") as tmp:
        split.to_csv(tmp, index=False, lineterminator="\n")
    return split
