"""Ingest: decode every raw file once into upright, RGB, shrunk JPEGs.

Layouts of ``raw_dir``
- ``root/<class>/<files>``: one folder per class.
- ``root/{train,val,test}/<class>/<files>``: the dataset's own split; any of the
  three folders present selects this layout and every file records its folder.

Only files directly inside a class folder are read. Hidden files (``.DS_Store``,
``._x.jpg``) and OS metadata (``__MACOSX``, ``Thumbs.db``) are ignored; any
other file elsewhere is reported as ``misplaced`` so nothing disappears silently.

Outputs in ``out_dir`` (replaced as a whole, so a failed run leaves it as it was)
- ``images/[<folder split>/]<class>/<safe stem>-<sha256[:8]>.jpg``
- ``manifest.csv``: path, label, sha256, width, height, folder_split, source,
  phash (perceptual hash) and group (the duplicate group: exact and near
  duplicates share one, see :mod:`transferlab.data.near_dups`)
- ``report.json``: kept counts per class, every rejected file with a reason,
  groups of exact duplicates and of near-duplicates among kept files (all
  kept: the split stage keeps each group in one part).

Decoding itself (limits, EXIF orientation, RGB, shrinking) is
:mod:`transferlab.data.imaging`, shared with the predictor. ``ingest.workers``
processes decode and re-encode in parallel; the main process names and writes
the files in source order, so the outputs are byte-identical for any count.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import re
import threading
import unicodedata
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from tqdm import tqdm

from transferlab.config import PARTS, IngestParams
from transferlab.cores import usable_cores
# decoding lives in imaging (shared with predict); names re-exported for ingest's callers
from transferlab.data.imaging import (  # noqa: F401
    CORRUPT, EMPTY_FILE, FILE_TOO_LARGE, NOT_AN_IMAGE, TOO_MANY_PIXELS, TRUNCATED, UNREADABLE, Rejected, decode_image,
    read_limited, rejection_reason, strict_pillow,
)
from transferlab.data.near_dups import assign_groups, perceptual_hashes, report_groups
from transferlab.errors import UserError
from transferlab.io import atomic_dir, sha256_bytes

# q95 keeps re-encoding loss far below what augmentation and the backbone's own
# resize do, at ~1/5 of the size of a lossless PNG of the same photo.
JPEG_QUALITY = 95
OUTPUT_SUFFIX = ".jpg"
IMAGES_DIR = "images"
MANIFEST_NAME = "manifest.csv"
REPORT_NAME = "report.json"
MANIFEST_COLUMNS = ["path", "label", "sha256", "width", "height", "folder_split", "source", "phash", "group"]

SHA_PREFIX_CHARS = 8
# 60 characters of up to 4 UTF-8 bytes each, plus "-<sha8>-<n>.jpg", stays under
# the 255-byte file name limit of common file systems.
MAX_STEM_CHARS = 60
FALLBACK_STEM = "image"
# Folders and files that operating systems and archivers add beside user data.
IGNORED_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})

# Rejection reasons beside imaging's (UNREADABLE, CORRUPT, ...): stable codes for scripts.
MISPLACED = "misplaced"
EXTENSION = "extension"

LAYOUT_FOLDERS = "folders"
LAYOUT_FLAT = "flat"
LAYOUT_HELP = "expected root/<class>/<images> or root/{train,val,test}/<class>/<images>"


class IngestError(UserError, ValueError):
    """The raw data cannot make a usable dataset; out_dir was left as it was."""

    def __init__(self, message: str, report: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Candidate:
    """A file directly inside a class folder, still to be decoded."""

    path: Path  # where to read it
    source: str  # posix path relative to raw_dir, as reported everywhere
    label: str
    folder_split: str  # "train", "val" or "test" in a folder-split layout, else ""


@dataclass(frozen=True)
class _Layout:
    kind: str
    classes: list[str]
    candidates: list[Candidate]
    strays: list[str]  # source paths of files outside any class folder


@dataclass(frozen=True)
class _Decoded:
    jpeg: bytes  # the shrunk image, encoded as it is written
    sha256: str  # of the raw file
    width: int  # of the upright original, before shrinking
    height: int
    phash: str  # perceptual hashes of the decoded image and of its mirror image (near_dups)
    phash_mirror: str


# candidates per task sent to a worker: few enough round trips, small enough to balance
CHUNK = 8


# ---------------------------------------------------------------- discovery


def _visible(entry: Path) -> bool:
    return not entry.name.startswith(".") and entry.name not in IGNORED_NAMES


def _entries(folder: Path) -> list[Path]:
    return sorted((e for e in folder.iterdir() if _visible(e)), key=lambda e: e.name)


def _files_under(folder: Path) -> Iterator[Path]:
    for entry in _entries(folder):
        if entry.is_dir():
            yield from _files_under(entry)
        else:
            yield entry


def _label(name: str) -> str:
    # macOS stores names decomposed (NFD): normalise so a class is one label everywhere
    return unicodedata.normalize("NFC", name)


def _layout(raw_dir: Path) -> _Layout:
    def rel(p: Path) -> str:
        return p.relative_to(raw_dir).as_posix()

    top = _entries(raw_dir)
    dirs = [d for d in top if d.is_dir()]
    strays = [rel(f) for f in top if not f.is_dir()]
    folder_split = any(d.name in PARTS for d in dirs)
    class_dirs: list[tuple[Path, str]] = []  # (class folder, folder split)
    for d in dirs:
        if not folder_split:
            class_dirs.append((d, ""))
        elif d.name in PARTS:
            for entry in _entries(d):
                if entry.is_dir():
                    class_dirs.append((entry, d.name))
                else:
                    strays.append(rel(entry))
        else:
            strays.extend(rel(f) for f in _files_under(d))
    candidates = []
    for folder, split in class_dirs:
        for entry in _entries(folder):
            if entry.is_dir():
                strays.extend(rel(f) for f in _files_under(entry))
            else:
                candidates.append(Candidate(entry, rel(entry), _label(folder.name), split))
    return _Layout(
        kind=LAYOUT_FOLDERS if folder_split else LAYOUT_FLAT,
        classes=sorted({_label(folder.name) for folder, _ in class_dirs}),
        candidates=sorted(candidates, key=lambda c: c.source),
        strays=sorted(strays),
    )


def discover(raw_dir: Path) -> list[Candidate]:
    """Every visible file directly inside a class folder of ``raw_dir``, sorted by source."""
    return _layout(Path(raw_dir)).candidates


# ---------------------------------------------------------------- decoding (imaging.decode_image)


def _check_extension(path: Path, extensions: list[str] | None) -> None:
    if extensions is not None and path.suffix.lower() not in {e.lower() for e in extensions}:
        raise Rejected(EXTENSION, f"{path.suffix or 'no extension'} is not in ingest.extensions {extensions}")


def _process(candidate: Candidate, params: IngestParams) -> _Decoded:
    _check_extension(candidate.path, params.extensions)
    data = read_limited(candidate.path, params.max_file_mb)
    image, (width, height) = decode_image(data, params.max_side)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return _Decoded(buffer.getvalue(), sha256_bytes(data), width, height, *perceptual_hashes(image))


def _attempt(candidate: Candidate, params: IngestParams) -> _Decoded | tuple[str, str]:
    """The decoded file, or its rejection ``(reason, detail)``: one bad file must never stop the run."""
    try:
        with strict_pillow(params.max_pixels):
            return _process(candidate, params)
    except Exception as exc:  # noqa: BLE001
        return rejection_reason(exc, params)


def _start_method() -> str:
    """fork while this process runs one thread (workers start at once, nothing to re-import), else spawn.

    A forked child gets a copy of every lock, and one that another thread held
    (tracking clients, a notebook's threads) would never be released in it.
    """
    alone = threading.active_count() == 1
    return "fork" if alone and "fork" in multiprocessing.get_all_start_methods() else "spawn"


def _decoded(candidates: list[Candidate], params: IngestParams) -> Iterator[_Decoded | tuple[str, str]]:
    """``_attempt`` of every candidate, in order, on ``ingest.workers`` processes."""
    workers = min(params.workers or usable_cores(), max(1, len(candidates) // CHUNK))
    if workers == 1:
        yield from (_attempt(c, params) for c in candidates)
        return
    context = multiprocessing.get_context(_start_method())
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        yield from pool.map(_attempt, candidates, [params] * len(candidates), chunksize=CHUNK)


# ---------------------------------------------------------------- outputs


def safe_stem(name: str) -> str:
    """File stem fit for any file system: letters and digits of any script kept, rest '_'."""
    stem = unicodedata.normalize("NFC", PurePosixPath(name).stem)
    # categories L (letters), N (digits), M (accents and vowel signs of many scripts)
    kept = "".join(ch if unicodedata.category(ch)[0] in "LNM" or ch in "-_" else "_" for ch in stem)
    # a leading '-' reads as an option to shell tools; runs of '_' are noise
    tidy = re.sub(r"_+", "_", kept).strip("_-")[:MAX_STEM_CHARS].rstrip("_-")
    return tidy or FALLBACK_STEM


def _output_path(candidate: Candidate, sha256: str, taken: set[str]) -> str:
    parts = [IMAGES_DIR, *([candidate.folder_split] if candidate.folder_split else []), candidate.label]
    base = f"{safe_stem(candidate.path.name)}-{sha256[:SHA_PREFIX_CHARS]}"
    name, n = base + OUTPUT_SUFFIX, 1
    # identical bytes under names that clean to one stem ("a b.jpg", "a_b.jpg"), and
    # case-insensitive file systems: number them in source order, so still stable
    while "/".join([*parts, name]).casefold() in taken:
        n += 1
        name = f"{base}-{n}{OUTPUT_SUFFIX}"
    path = "/".join([*parts, name])
    taken.add(path.casefold())
    return path


def _write_manifest(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _duplicates(rows: list[dict[str, Any]]) -> list[list[str]]:
    by_sha: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        by_sha[row["sha256"]].append(row["source"])
    return sorted(sorted(group) for group in by_sha.values() if len(group) > 1)


def _check_classes(report: dict[str, Any], params: IngestParams, raw_dir: Path) -> None:
    counts: dict[str, int] = report["counts"]
    populated = [c for c, n in counts.items() if n > 0]
    if len(populated) < 2:
        raise IngestError(
            f"need at least 2 classes with kept images, found {len(populated)}"
            f" ({', '.join(populated) or 'none'}) in {raw_dir}; {LAYOUT_HELP}",
            report,
        )
    rejected_by_class: dict[str, Counter[str]] = defaultdict(Counter)
    for item in report["rejected"]:
        if item["label"]:
            rejected_by_class[item["label"]][item["reason"]] += 1
    short = []
    for label, n in counts.items():
        if n < params.min_per_class:
            why = rejected_by_class[label]
            extra = f", {sum(why.values())} rejected ({', '.join(f'{r}: {k}' for r, k in sorted(why.items()))})"
            short.append(f"class {label!r} has {n} kept image(s){extra if why else ''}")
    if short:
        raise IngestError(
            f"{'; '.join(short)}; ingest.min_per_class is {params.min_per_class}."
            " Add images, remove the class folder, or lower ingest.min_per_class.",
            report,
        )


def _check_dirs(raw_dir: Path, out_dir: Path) -> None:
    if not raw_dir.is_dir():
        raise IngestError(f"raw data folder {raw_dir} does not exist; {LAYOUT_HELP}")
    raw_abs, out_abs = raw_dir.resolve(), out_dir.resolve()
    if raw_abs == out_abs or raw_abs in out_abs.parents or out_abs in raw_abs.parents:
        # replacing out_dir as a whole would delete the input, or ingest its own output
        raise IngestError(f"out_dir {out_dir} and raw_dir {raw_dir} must not contain one another")


def _convert_all(
    layout: _Layout, tmp: Path, params: IngestParams, progress: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Write every decodable candidate under ``tmp``; return (manifest rows, rejections)."""
    rows: list[dict[str, Any]] = []
    rejected = [
        {"path": s, "reason": MISPLACED, "detail": f"not directly inside a class folder; {LAYOUT_HELP}", "label": ""}
        for s in layout.strays
    ]
    taken: set[str] = set()
    decoded_all = _decoded(layout.candidates, params)
    for cand, decoded in tqdm(zip(layout.candidates, decoded_all), desc="ingest", unit="img",
                              total=len(layout.candidates), disable=not progress):
        if isinstance(decoded, tuple):
            reason, detail = decoded
            rejected.append({"path": cand.source, "reason": reason, "detail": detail, "label": cand.label})
            continue
        rel = _output_path(cand, decoded.sha256, taken)
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(decoded.jpeg)
        rows.append(
            {
                "path": rel,
                "label": cand.label,
                "sha256": decoded.sha256,
                "width": decoded.width,
                "height": decoded.height,
                "folder_split": cand.folder_split,
                "source": cand.source,
                "phash": decoded.phash,
                "phash_mirror": decoded.phash_mirror,  # not written: groups are made of it here
            }
        )
    return rows, rejected


def ingest(raw_dir: Path, out_dir: Path, params: IngestParams, progress: bool = False) -> dict[str, Any]:
    """Decode every file of ``raw_dir`` into ``out_dir``; return the report.

    Bad files are rejected one by one, never fatal. Raises IngestError, with
    ``out_dir`` untouched, when fewer than 2 classes or a class under
    ``params.min_per_class`` remain. Pillow's pixel limit and truncation switch
    are process-wide: do not decode images in other threads during the call.
    ``params.workers`` processes decode (None: :func:`usable_cores`).
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    _check_dirs(raw_dir, out_dir)
    layout = _layout(raw_dir)
    with atomic_dir(out_dir) as tmp:
        rows, rejected = _convert_all(layout, tmp, params, progress)
        assign_groups(rows, params.near_dup_distance, params.near_dup_mirror)
        report = _report(layout, rows, rejected, params)
        _check_classes(report, params, raw_dir)  # raising here discards tmp: out_dir untouched
        _write_manifest(tmp / MANIFEST_NAME, rows)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return report


def _report(
    layout: _Layout,
    rows: list[dict[str, Any]],
    rejected: list[dict[str, Any]],
    params: IngestParams,
) -> dict[str, Any]:
    counts = Counter(row["label"] for row in rows)
    labels_of = {row["source"]: row["label"] for row in rows}
    duplicates = _duplicates(rows)
    near, near_across = report_groups(rows)
    return {
        "layout": layout.kind,
        "params": params.deciding(),
        "counts": {label: counts.get(label, 0) for label in layout.classes},
        "total": {"seen": len(rows) + len(rejected), "kept": len(rows), "rejected": len(rejected)},
        "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "rejected": sorted(rejected, key=lambda r: r["path"]),
        "duplicates": duplicates,
        # the same bytes under two labels: at least one label is wrong
        "duplicates_across_classes": [g for g in duplicates if len({labels_of[s] for s in g}) > 1],
        # near-duplicates (ingest.near_dup_distance): groups of 2+ different files, exact copies included
        "near_duplicates": near,
        "near_duplicates_across_classes": near_across,
    }
