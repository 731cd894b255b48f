"""Image decoding, the one place: read with limits, decode, orient, convert to RGB, shrink.

Ingest decodes every raw file through :func:`decode_image`; a predictor decodes
new images through the same function with the settings ingest used, so a model
never sees pixels prepared differently from its training images. The image
Dataset (:mod:`transferlab.data.images`) opens files through :func:`open_rgb`.

- :func:`strict_pillow`: Pillow's decompression-bomb limit and truncation switch
  for one call (they are process-wide globals).
- :func:`read_limited`: a file's bytes, refusing empty and oversized files.
- :func:`to_rgb`: any Pillow mode to RGB; 16-bit and float images are scaled,
  not clipped; transparency is composited over white.
- :func:`rejection_reason`: a stable reason code and a detail for whatever
  decoding a bad file raised.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, JpegImagePlugin, UnidentifiedImageError

if TYPE_CHECKING:  # annotation only: the ONNX prediction path decodes through here without pydantic
    from transferlab.config import IngestParams

BYTES_PER_MB = 1024 * 1024
# Reduce by whole factors first, then LANCZOS the last < 3x: Pillow documents this
# as indistinguishable from a full LANCZOS and it is several times faster.
REDUCING_GAP = 3.0
WHITE = (255, 255, 255, 255)
UINT8_MAX = 255
UINT16_MAX = 65535
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# EXIF orientations 5-8 include a 90 degree turn: width and height trade places.
AXIS_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
# Pillow opens EPS by running Ghostscript, an external interpreter: not for untrusted files.
UNSAFE_FORMATS = frozenset({"EPS"})

# Rejection reasons: stable codes for scripts; the detail is for humans.
UNREADABLE = "unreadable"
EMPTY_FILE = "empty_file"
FILE_TOO_LARGE = "file_too_large"
NOT_AN_IMAGE = "not_an_image"
TOO_MANY_PIXELS = "too_many_pixels"
TRUNCATED = "truncated"
CORRUPT = "corrupt"


class Rejected(Exception):
    """A file refused before or instead of decoding, with a stable ``reason`` code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@contextlib.contextmanager
def strict_pillow(max_pixels: int) -> Iterator[None]:
    """Pillow's bomb limit and truncation switch are module globals: set them for one call.

    Another caller (a DataLoader, a notebook) may have relaxed either; a
    truncated photo must be rejected here, not padded with grey.
    """
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x the limit; ours is a hard limit
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def read_limited(path: Path, max_file_mb: float) -> bytes:
    """The bytes of ``path``; :class:`Rejected` if unreadable, empty or over ``max_file_mb``."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise Rejected(UNREADABLE, str(exc)) from exc
    if size == 0:
        raise Rejected(EMPTY_FILE, "the file has 0 bytes")
    if size > max_file_mb * BYTES_PER_MB:
        raise Rejected(
            FILE_TOO_LARGE,
            f"{size / BYTES_PER_MB:.1f} MB is over ingest.max_file_mb = {max_file_mb}",
        )
    try:
        return path.read_bytes()
    except OSError as exc:
        raise Rejected(UNREADABLE, str(exc)) from exc


def shrunk_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """Size with the shorter side at most ``max_side``, aspect kept, never larger."""
    width, height = size
    shorter = min(width, height)
    if shorter <= max_side:
        return size
    scale = max_side / shorter
    return max(1, round(width * scale)), max(1, round(height * scale))


def _sixteen_bit_to_rgb(img: Image.Image) -> Image.Image:
    # Pillow's own convert("L") clips at 255, turning a 16-bit photo almost white:
    # scale 0..65535 onto 0..255 instead, rounding half up.
    data = np.clip(np.asarray(img).astype(np.int64), 0, UINT16_MAX)
    eight = (data * UINT8_MAX + UINT16_MAX // 2) // UINT16_MAX
    return Image.fromarray(eight.astype(np.uint8)).convert("RGB")


def _float_to_rgb(img: Image.Image) -> Image.Image:
    # Float images have no fixed range: [0, 1] is the usual convention, anything
    # else is read as 0..255 and clipped, as Pillow's own F -> L does.
    data = np.nan_to_num(np.asarray(img).astype(np.float64), nan=0.0)
    if data.size and data.min() >= 0 and data.max() <= 1:
        data = data * UINT8_MAX
    eight = np.clip(np.rint(data), 0, UINT8_MAX)
    return Image.fromarray(eight.astype(np.uint8)).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """A new RGB image of ``img`` (any mode); the result does not depend on ``img``'s file."""
    if img.mode in SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(img)
    if img.mode == "F":
        return _float_to_rgb(img)
    if img.has_transparency_data:
        # Transparent pixels keep whatever colour the encoder left (often black):
        # dropping alpha would show it. White is how viewers and web pages show
        # cut-outs and logos, so the model sees what a person saw.
        background = Image.new("RGBA", img.size, WHITE)
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def safe_formats() -> list[str]:
    """Every format Pillow can open except those that run external programs (EPS)."""
    Image.init()  # registers every plugin, so the list is complete
    return sorted(f for f in Image.OPEN if f not in UNSAFE_FORMATS)


def decode_image(data: bytes, max_side: int) -> tuple[Image.Image, tuple[int, int]]:
    """Upright RGB image shrunk to ``max_side``, and the upright original size."""
    # open() reads only the header and, under strict_pillow, refuses more than
    # ingest.max_pixels before a single pixel is decoded
    with Image.open(io.BytesIO(data), formats=safe_formats()) as img:
        width, height = img.size
        if isinstance(img, JpegImagePlugin.JpegImageFile):  # also MPO, from cameras
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale when the image is at least
            # that many times the target: most of the time of a big photo saved
            img.draft(None, shrunk_size(img.size, max_side))
        img.load()
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        ImageOps.exif_transpose(img, in_place=True)
        rgb = to_rgb(img)
    if orientation in AXIS_SWAPPING_ORIENTATIONS:
        width, height = height, width
    target = shrunk_size(rgb.size, max_side)
    if target != rgb.size:
        rgb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)
    return rgb, (width, height)


def open_rgb(path: Path) -> Image.Image:
    """The upright RGB image in the file ``path``, at full size; the file is closed on return.

    For files ingest already wrote (upright RGB JPEGs) this is one decode and,
    at most, a copy: no limits apply beyond Pillow's own, as the files are ours.
    """
    with Image.open(path, formats=safe_formats()) as img:
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
        return to_rgb(img)


def rejection_reason(exc: Exception, params: IngestParams) -> tuple[str, str]:
    """(reason, detail) for whatever decoding a bad file raised."""
    if isinstance(exc, Rejected):
        return exc.reason, exc.detail
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        # Pillow's message quotes twice the limit for its hard error: name ours
        size = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = size.group(1) if size else "too many"
        return TOO_MANY_PIXELS, f"{pixels} pixels is over ingest.max_pixels = {params.max_pixels}"
    if isinstance(exc, UnidentifiedImageError):
        return NOT_AN_IMAGE, "no image format that ingest reads recognises this file"
    detail = f"{type(exc).__name__}: {exc}"
    # Pillow signals a short read only through the message of an OSError
    if isinstance(exc, OSError) and "truncated" in str(exc).lower():
        return TRUNCATED, detail
    return CORRUPT, detail
