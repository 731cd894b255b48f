"""Get an image-folder dataset into ``data/raw`` from a builtin set, an archive, a URL or a folder.

Everything is assembled in scratch space beside the target and renamed into
place at the end (``io.atomic_dir``), so a failure of any kind (network,
checksum, unsafe archive, wrong layout) leaves the target as it was. Archives
are unpacked by :mod:`transferlab.data.archives` (member checks and size caps);
its public names are re-exported here.
"""

from __future__ import annotations

import http.client
import os
import re
import types
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Callable, Mapping

import numpy as np

from transferlab.config import IMAGE_EXTENSIONS, PARTS
# re-exported: sources.py was their home before archives.py
from transferlab.data.archives import (  # noqa: F401
    DEFAULT_LIMITS, IGNORED_NAMES, MAX_DOWNLOAD_BYTES, MAX_MEMBER_BYTES, MAX_MEMBERS, MAX_TOTAL_BYTES, TAR_SUFFIXES,
    ZIP_SUFFIXES, GiB, Limits, MiB, SourceError, _Budget, _copy_capped, copy_tree, extract_archive,
    is_ignored,
)
from transferlab.io import CHUNK, atomic_dir, scratch_dir, sha256_file

# Per socket operation, not per download: a dead network fails fast, a slow one still finishes.
DOWNLOAD_TIMEOUT_S = 15.0

HYMENOPTERA = "hymenoptera"
HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
# sha256 of hymenoptera_data.zip: None until a value has been verified against the
# official archive; fill it in then, and every download is checked against it.
KNOWN_SHA256: str | None = None
# JPEGs per folder, counted on an extracted copy of the archive: train/ants holds 124 files,
# 122 .jpg + 1 .jpeg + the stray imageNotFound.gif that image loaders keyed on .jpg skip.
HYMENOPTERA_COUNTS: Mapping[str, int] = types.MappingProxyType(
    {"train/ants": 123, "train/bees": 121, "val/ants": 70, "val/bees": 83}
)
JPEG_SUFFIXES = frozenset({".jpg", ".jpeg"})

BUILTIN_PREFIX = "builtin:"
LFW_FACES = "builtin:lfw-faces"
DIGITS = "builtin:digits"
LFW_COUNT_PER_CLASS = 100  # lfw_subset(): the first 100 images are faces, the next 100 are not
LFW_SIDE = 25
DIGITS_MAX_LEVEL = 16  # load_digits() pixels are grey levels 0..16
UINT8_MAX = 255

ACCEPTED_LAYOUTS = "root/<class>/<images> or root/{train,val,test}/<class>/<images>"
# Suffixes counted as images when a caller names none: ingest's default (ingest.extensions).
DEFAULT_SUFFIXES = frozenset(IMAGE_EXTENSIONS)
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def get_source(source: str, out: str | Path, sha256: str | None = None, force: bool = False,
               limits: Limits = DEFAULT_LIMITS, extensions: frozenset[str] | None = DEFAULT_SUFFIXES) -> Path:
    """Write the image-folder dataset ``source`` into ``out`` and return ``out``.

    ``source`` is ``builtin:lfw-faces``, ``builtin:digits``, ``hymenoptera``, an
    http(s) URL of an archive, a local ``.zip``/``.tar[.gz]``/``.tgz`` or a local
    folder. ``sha256`` checks an archive before anything is extracted. A
    non-empty ``out`` is replaced only with ``force``. ``extensions`` are the
    suffixes ingest reads (``ingest.extensions``; None: whatever Pillow decodes):
    every class folder needs at least one such image. Raises SourceError.
    """
    out = Path(out)
    expected = _normalize_sha256(sha256)
    _check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    # scratch beside the target: same filesystem, so extracted files are renamed, not copied
    with scratch_dir(out, "get") as scratch, atomic_dir(out) as tmp:
        _fill(source, tmp, scratch, expected, limits, out)
        check_layout(tmp, source, extensions)
    return out


def _fill(source: str, dest: Path, scratch: Path, sha256: str | None, limits: Limits, out: Path) -> None:
    """Put the dataset's root folder contents into ``dest``."""
    if source.startswith(BUILTIN_PREFIX):
        _refuse_sha256(source, sha256, "a builtin dataset")
        _builtin_writer(source)(dest)
    elif source == HYMENOPTERA:
        _get_hymenoptera(dest, scratch, sha256, limits)
    elif _is_url(source):
        archive = download(source, scratch, limits.download_bytes)
        _verify_sha256(archive, sha256, source)
        _unpack(archive, dest, scratch, limits)
    else:
        _fill_local(Path(source), dest, scratch, sha256, limits, out)


def _fill_local(path: Path, dest: Path, scratch: Path, sha256: str | None, limits: Limits, out: Path) -> None:
    if path.is_dir():
        _refuse_sha256(str(path), sha256, "a folder")
        _refuse_overlap(path, out)
        copy_tree(dataset_root(path), dest)
    elif path.is_file():
        _verify_sha256(path, sha256, str(path))
        _unpack(path, dest, scratch, limits)
    else:
        raise SourceError(
            f"unknown source {str(path)!r}: not a builtin ({LFW_FACES}, {DIGITS}), not {HYMENOPTERA!r}, "
            "not an http(s) URL and no such file or folder"
        )


# --- target and checksum -------------------------------------------------------------------


def _check_target(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SourceError(f"{out} exists and is not a folder; remove it or choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise SourceError(f"{out} already exists and is not empty; pass --force to replace it")


def _normalize_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if not SHA256_HEX.fullmatch(value):
        raise SourceError(f"sha256 must be 64 hexadecimal characters, got {sha256!r}")
    return value


def _refuse_sha256(source: str, sha256: str | None, what: str) -> None:
    # silently skipping a requested check would look like a passed check
    if sha256 is not None:
        raise SourceError(f"--sha256 checks an archive, but {source} is {what}; drop --sha256")


def _verify_sha256(archive: Path, expected: str | None, source: str) -> None:
    if expected is None:
        return
    actual = sha256_file(archive)
    if actual != expected:
        raise SourceError(f"sha256 mismatch for {source}: expected {expected}, got {actual}; nothing was written")


def _refuse_overlap(src: Path, out: Path) -> None:
    # copying a folder into itself would walk its own partial copy
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r or out_r.is_relative_to(src_r):
        raise SourceError(f"the output folder {out} is inside the source folder {src}; choose another --out")


# --- builtin datasets ----------------------------------------------------------------------


def _builtin_writer(source: str) -> Callable[[Path], None]:
    if source == LFW_FACES:
        return write_lfw_faces
    if source == DIGITS:
        return write_digits
    raise SourceError(f"unknown builtin source {source!r}; available: {LFW_FACES}, {DIGITS}")


def _save_png(pixels: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path, format="PNG")


def _to_uint8(values: np.ndarray, max_value: float) -> np.ndarray:
    scaled = np.asarray(values, dtype=np.float64) * (UINT8_MAX / max_value)
    return np.clip(np.rint(scaled), 0, UINT8_MAX).astype(np.uint8)


def write_lfw_faces(dest: Path) -> None:
    """scikit-image's bundled LFW subset as ``faces/`` and ``non_faces/`` PNGs (25x25, grey)."""
    from skimage.data import lfw_subset

    images = np.asarray(lfw_subset())
    expected_shape = (2 * LFW_COUNT_PER_CLASS, LFW_SIDE, LFW_SIDE)
    if images.shape != expected_shape:
        raise SourceError(f"skimage.data.lfw_subset() returned shape {images.shape}, expected {expected_shape}")
    # documented as uint8 but returned as floats in [0, 1] by the versions we use
    pixels = images if images.dtype == np.uint8 else _to_uint8(images, 1.0)
    halves = (("faces", "face", pixels[:LFW_COUNT_PER_CLASS]), ("non_faces", "non_face", pixels[LFW_COUNT_PER_CLASS:]))
    for folder, stem, block in halves:
        (dest / folder).mkdir()
        for i, image in enumerate(block):
            _save_png(image, dest / folder / f"{stem}_{i:03d}.png")


def write_digits(dest: Path) -> None:
    """scikit-learn's bundled 8x8 digits as PNG class folders ``0``..``9``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = _to_uint8(digits.images, DIGITS_MAX_LEVEL)
    for label in sorted(set(int(t) for t in digits.target)):
        (dest / str(label)).mkdir()
    for i, (image, label) in enumerate(zip(pixels, digits.target)):
        _save_png(image, dest / str(int(label)) / f"digit_{i:04d}.png")


# --- hymenoptera ---------------------------------------------------------------------------


def _get_hymenoptera(dest: Path, scratch: Path, sha256: str | None, limits: Limits) -> None:
    archive = download(HYMENOPTERA_URL, scratch, limits.download_bytes)
    _verify_sha256(archive, sha256, HYMENOPTERA_URL)
    _verify_sha256(archive, KNOWN_SHA256, HYMENOPTERA_URL)
    _unpack(archive, dest, scratch, limits)
    verify_hymenoptera(dest)


def verify_hymenoptera(root: Path) -> None:
    """Check the JPEG count of each train/val class folder against the official archive."""
    problems = []
    for folder, expected in HYMENOPTERA_COUNTS.items():
        path = root / folder
        found = _count_files(path, JPEG_SUFFIXES) if path.is_dir() else 0
        if found != expected:
            problems.append(f"{folder}: {found} JPEGs, expected {expected}")
    if problems:
        raise SourceError(f"hymenoptera archive does not match the official one: {'; '.join(problems)}")


def _count_files(folder: Path, suffixes: frozenset[str]) -> int:
    return sum(1 for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)


# --- download ------------------------------------------------------------------------------


def _is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https")


def _url_filename(url: str) -> str:
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    # the name only picks the archive type; never let it climb out of the scratch folder
    return name if name not in ("", ".", "..") else "download"


def _download_hint(url: str) -> str:
    name = _url_filename(url)
    stem = name
    for suffix in ZIP_SUFFIXES + TAR_SUFFIXES:
        if name.lower().endswith(suffix):
            stem = name[: -len(suffix)]
            break
    return (
        f"Download it elsewhere and run `transferlab data get /path/to/{name}`, "
        f"or point at an extracted folder: `transferlab data get /path/to/{stem}`"
    )


def download(url: str, dest_dir: Path, max_bytes: int = MAX_DOWNLOAD_BYTES) -> Path:
    """Stream ``url`` into a file in ``dest_dir``, refusing more than ``max_bytes``."""
    dest = dest_dir / _url_filename(url)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(dest, "wb") as fh:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise SourceError(f"{url} is {declared} bytes, over the download limit of {max_bytes} bytes")
            received = 0
            while chunk := response.read(CHUNK):
                received += len(chunk)
                if received > max_bytes:
                    raise SourceError(f"{url} sent more than the download limit of {max_bytes} bytes")
                fh.write(chunk)
    except urllib.error.HTTPError as exc:
        raise SourceError(f"could not download {url}: HTTP {exc.code} {exc.reason}. {_download_hint(url)}") from exc
    except urllib.error.URLError as exc:
        raise SourceError(f"could not download {url}: {exc.reason}. {_download_hint(url)}") from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise SourceError(f"could not download {url}: {exc}. {_download_hint(url)}") from exc
    return dest


# --- archives ------------------------------------------------------------------------------


def _unpack(archive: Path, dest: Path, scratch: Path, limits: Limits) -> None:
    extracted = scratch / "extracted"
    extracted.mkdir()
    extract_archive(archive, extracted, limits)
    root = dataset_root(extracted)
    for child in root.iterdir():
        if not is_ignored(child.name):
            os.replace(child, dest / child.name)


# --- folders and layout --------------------------------------------------------------------


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not is_ignored(p.name))


def _pillow_suffixes() -> frozenset[str]:
    from PIL import Image

    Image.init()
    return frozenset(Image.registered_extensions())


def _is_image(path: Path, extensions: frozenset[str] | None = None) -> bool:
    """A file with an image suffix: one of ``extensions``, or any Pillow knows when None."""
    return path.is_file() and path.suffix.lower() in (extensions if extensions is not None else _pillow_suffixes())


def dataset_root(folder: Path) -> Path:
    """``folder``, or its only subfolder when it merely wraps the dataset (``x.zip`` -> ``x/``).

    A lone ``train``/``val``/``test`` folder or a lone folder of images is part of
    the dataset's layout, so it is kept.
    """
    children = _visible(folder)
    if len(children) != 1 or not children[0].is_dir():
        return folder
    only = children[0]
    if only.name in PARTS or any(_is_image(p) for p in only.iterdir()):
        return folder
    return only


def _layout_error(source: str, problem: str) -> SourceError:
    return SourceError(f"{source}: unrecognised dataset layout: {problem}. Accepted layouts: {ACCEPTED_LAYOUTS}")


def _class_counts(parent: Path, root: Path, source: str, extensions: frozenset[str] | None) -> dict[str, int]:
    where = parent.relative_to(root).as_posix() if parent != root else "the top level"
    entries = _visible(parent)
    loose = [p.name for p in entries if _is_image(p)]
    if loose:
        raise _layout_error(source, f"images directly in {where} (e.g. {loose[0]}), not in class folders")
    classes = [p for p in entries if p.is_dir()]
    if not classes:
        raise _layout_error(source, f"no class folders in {where}")
    counts = {}
    for folder in classes:
        files = [p for p in folder.iterdir() if not is_ignored(p.name)]
        n = sum(1 for p in files if _is_image(p, extensions))
        if n == 0:
            others = sorted({p.suffix.lower() or "(no suffix)" for p in files if p.is_file()})
            found = f"; it holds {', '.join(others)} files" if others else ""
            allowed = ", ".join(sorted(extensions)) if extensions is not None else "any format Pillow reads"
            raise _layout_error(source, f"class folder {folder.relative_to(root).as_posix()} has no images that "
                                        f"ingest reads ({allowed}; ingest.extensions){found}")
        counts[folder.relative_to(root).as_posix()] = n
    return counts


def check_layout(root: Path, source: str | None = None,
                 extensions: frozenset[str] | None = DEFAULT_SUFFIXES) -> dict[str, int]:
    """Images ingest will read (``extensions``) per class folder (``cls`` or ``part/cls``).

    Raises SourceError on any other layout, or for a class folder without one such image.
    """
    source = source or str(root)
    folders = [p for p in _visible(root) if p.is_dir()]
    parts = [p for p in folders if p.name in PARTS]
    if not parts:
        return _class_counts(root, root, source, extensions)
    if len(parts) != len(folders):
        others = ", ".join(p.name for p in folders if p.name not in PARTS)
        raise _layout_error(source, f"split folders ({', '.join(p.name for p in parts)}) mixed with others ({others})")
    loose = [p.name for p in _visible(root) if _is_image(p)]
    if loose:
        raise _layout_error(source, f"images directly in the top level (e.g. {loose[0]})")
    counts: dict[str, int] = {}
    for part in parts:
        counts.update(_class_counts(part, root, source, extensions))
    return counts


def skipped_files(root: Path, extensions: frozenset[str] | None) -> dict[str, int]:
    """Files in class folders that ingest will reject for their suffix, counted by suffix."""
    if extensions is None:
        return {}
    skipped: dict[str, int] = {}
    for path in sorted(root.rglob("*")):
        parts = path.relative_to(root).parts
        if path.is_file() and not any(is_ignored(p) for p in parts) and path.suffix.lower() not in extensions:
            skipped[path.suffix.lower() or "(no suffix)"] = skipped.get(path.suffix.lower() or "(no suffix)", 0) + 1
    return skipped
