"""Near-duplicate images: perceptual hashes and the groups they make.

Every kept image gets a 64-bit pHash (``imagehash.phash``: the low frequencies
of the DCT of a 32 x 32 grey thumbnail) of the decoded image, and one of its
mirror image. Two images are near-duplicates when their hashes differ in at
most ``ingest.near_dup_distance`` bits (with ``near_dup_mirror``: either hash of
one against the other's). Groups are the connected components of that
relation together with exact duplicates (same sha256), so one photo saved at
another size, recompressed, lightly cropped or mirrored joins its original.

Measured on the 397 hymenoptera photos (README): a half-size copy
recompressed at JPEG quality 60 differs by 0-2 bits, a 5% crop by 2-12
(28 of 30 within 8), a mirrored copy from the mirror hash by 0-2; distinct photos
by 14 bits at least (12 with mirror hashes). The default, 8, leaves a margin
on both sides.

Images under 32 px on a side (pHash's own working size) are never
near-duplicates of anything: an 8 x 8 digit or a 25 x 25 thumbnail has fewer
pixels than the hash reads, and such images share hashes without being copies
(scikit-learn's digits: a group of 138). They are grouped by exact bytes only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

HASH_BITS = 64
HASH_HEX = HASH_BITS // 4
MIN_SIDE = 32  # pHash reads a 32 x 32 thumbnail: smaller originals are matched by their bytes only
# pairwise distances are computed a block of rows at a time: about this many uint64 cells per block
BLOCK_CELLS = 1 << 22


def perceptual_hashes(image: Image.Image) -> tuple[str, str]:
    """(pHash, pHash of the mirror image) of ``image``, each 16 hex digits."""
    import imagehash  # imports scipy and PyWavelets: only where hashes are made

    return str(imagehash.phash(image)), str(imagehash.phash(ImageOps.mirror(image)))


def _as_ints(hashes: Sequence[str]) -> np.ndarray:
    return np.array([int(h, 16) for h in hashes], dtype=np.uint64)


def close_pairs(hashes: Sequence[str], max_distance: int, mirrors: Sequence[str] | None = None) -> list[tuple[int, int]]:
    """Index pairs ``i < j`` whose hashes differ in at most ``max_distance`` bits.

    With ``mirrors`` (the hash of each image's mirror image), a pair also counts
    when one image's hash is that close to the other's mirror hash.
    """
    h = _as_ints(hashes)
    m = None if mirrors is None else _as_ints(mirrors)
    n = len(h)
    block = max(1, BLOCK_CELLS // max(n, 1))
    pairs: list[tuple[int, int]] = []
    for start in range(0, n, block):
        rows = h[start:start + block, None]
        distance = np.bitwise_count(rows ^ h[None, :])
        if m is not None:
            distance = np.minimum(distance, np.bitwise_count(rows ^ m[None, :]))
        i, j = np.nonzero(distance <= max_distance)
        i += start
        keep = i < j
        pairs.extend(zip(i[keep].tolist(), j[keep].tolist()))
    return pairs


def group_ids(keys: Sequence[str], pairs: Sequence[tuple[int, int]]) -> list[str]:
    """One group id per row: the smallest key (sha256) of its component.

    Rows with equal keys (exact duplicates) are always in one component; ``pairs``
    join further rows (near-duplicates). Ids depend only on the keys and pairs,
    never on row order.
    """
    parent = list(range(len(keys)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(a: int, b: int) -> None:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        join(first.setdefault(key, i), i)
    for a, b in pairs:
        join(a, b)
    smallest: dict[int, str] = {}
    for i, key in enumerate(keys):
        r = root(i)
        smallest[r] = min(smallest.get(r, key), key)
    return [smallest[root(i)] for i in range(len(keys))]


def near_duplicate_groups(
    keys: Sequence[str], hashes: Sequence[str], mirrors: Sequence[str], max_distance: int | None, mirror: bool,
    eligible: Sequence[bool] | None = None,
) -> list[str]:
    """Group id of every row (see :func:`group_ids`); ``max_distance`` None: exact duplicates only.

    Only ``eligible`` rows (default: all) are compared by hash; the others join exact copies only.
    """
    rows = [i for i in range(len(keys)) if eligible is None or eligible[i]]
    pairs = []
    if max_distance is not None:
        close = close_pairs([hashes[i] for i in rows], max_distance, [mirrors[i] for i in rows] if mirror else None)
        pairs = [(rows[a], rows[b]) for a, b in close]
    return group_ids(keys, pairs)


def assign_groups(rows: list[dict], max_distance: int | None, mirror: bool) -> None:
    """Set ``row["group"]`` on every manifest row (rows carry ``sha256``, ``phash``, ``phash_mirror``)."""
    ids = near_duplicate_groups([r["sha256"] for r in rows], [r["phash"] for r in rows],
                                [r["phash_mirror"] for r in rows], max_distance, mirror,
                                [min(int(r["width"]), int(r["height"])) >= MIN_SIDE for r in rows])
    for row, group in zip(rows, ids):
        row["group"] = group


def report_groups(rows: list[dict]) -> tuple[list[list[str]], list[list[str]]]:
    """(near-duplicate groups, those spanning classes): sorted source lists of groups of 2+ distinct files.

    A group of exact duplicates alone is not listed here (ingest lists it under ``duplicates``).
    """
    members: dict[str, list[dict]] = {}
    for row in rows:
        members.setdefault(row["group"], []).append(row)
    groups = [g for g in members.values() if len({r["sha256"] for r in g}) > 1]
    listed = sorted(sorted(r["source"] for r in g) for g in groups)
    across = sorted(sorted(r["source"] for r in g) for g in groups if len({r["label"] for r in g}) > 1)
    return listed, across
