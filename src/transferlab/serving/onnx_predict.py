"""Classify images with an exported ``model.onnx`` through onnxruntime: numpy, Pillow and onnxruntime only.

Nothing on this path imports torch (or pydantic, pandas, MLflow): a deployment installs
``onnxruntime numpy pillow`` and this package's source, and ``transferlab predict --model model.onnx``
(dispatched by :mod:`transferlab.launcher` before the full command line loads) runs here.

The model's metadata (written by :mod:`transferlab.serving.onnx_export`) says everything needed:
the class names, the preprocessing (shorter side resized to ``resize_size`` with ``interpolation``,
centre crop ``crop_size``, scaled to [0, 1], normalised by ``mean`` / ``std``) and how ingest decoded
the training images (``decode``: max_side, max_pixels, max_file_mb, through the one decoder
:mod:`transferlab.data.imaging`). The resize and crop follow torchvision's rules on PIL images (the eval
transform's), so the network sees the same pixels as in PyTorch.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
from PIL import Image

from transferlab.data import imaging
from transferlab.serving.columns import ERROR, LABEL, PATH, PROBABILITY, proba_column

ONNX_SUFFIX = ".onnx"
INPUT, OUTPUT = "image", "proba"
DEFAULT_BATCH = 16
DEFAULT_TOP_K = 3
EXIT_OK, EXIT_USER_ERROR = 0, 2  # transferlab.errors' codes (that module is torch-free too, but imports nothing here)
INTERPOLATION = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                 "bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX,
                 "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS}


class OnnxPredictor:
    """Images in, class probabilities out (columns follow ``classes``), on onnxruntime's CPU provider."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import onnxruntime

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such ONNX model (write one with `transferlab export`)")
        self.session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if "classes" not in meta or "preprocessing" not in meta:
            raise ValueError(f"{self.path}: not exported by `transferlab export` (no classes/preprocessing metadata)")
        self.classes: list[str] = json.loads(meta["classes"])
        self.preprocessing: dict[str, Any] = json.loads(meta["preprocessing"])
        self.decode = SimpleNamespace(**json.loads(meta["decode"]))
        self.extensions = frozenset(json.loads(meta["extensions"]))

    def open_image(self, path: str | os.PathLike[str]) -> Image.Image:
        """Decode one file the way ingest decoded the training images."""
        data = imaging.read_limited(Path(path), self.decode.max_file_mb)
        with imaging.strict_pillow(self.decode.max_pixels):
            image, _ = imaging.decode_image(data, self.decode.max_side)
        return image

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """3 x crop x crop float32: torchvision's Resize(shorter side) and CenterCrop on PIL, then normalise."""
        p = self.preprocessing
        image = image if image.mode == "RGB" else image.convert("RGB")
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = p["resize_size"], int(p["resize_size"] * long / short)
        size = (new_short, new_long) if w <= h else (new_long, new_short)
        if size != (w, h):
            image = image.resize(size, INTERPOLATION[p["interpolation"]])
        crop, (w, h) = p["crop_size"], image.size
        top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
        image = image.crop((left, top, left + crop, top + crop))
        array = np.asarray(image, dtype=np.float32) / np.float32(255)
        array = (array - np.asarray(p["mean"], dtype=np.float32)) / np.asarray(p["std"], dtype=np.float32)
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    def predict_proba(self, images: Sequence[Image.Image]) -> np.ndarray:
        batch = np.stack([self.preprocess(image) for image in images])
        return np.asarray(self.session.run([OUTPUT], {INPUT: batch})[0], dtype=np.float64)

    def classify(self, paths: Sequence[str | os.PathLike[str]], batch_size: int = DEFAULT_BATCH
                 ) -> tuple[np.ndarray, list[str | None]]:
        """(N x K probabilities, errors): a file that cannot be decoded gets a NaN row and its reason."""
        proba = np.full((len(paths), len(self.classes)), np.nan)
        errors: list[str | None] = [None] * len(paths)
        for start in range(0, len(paths), batch_size):
            rows, images = [], []
            for i in range(start, min(start + batch_size, len(paths))):
                try:
                    images.append(self.open_image(paths[i]))
                    rows.append(i)
                except Exception as exc:  # noqa: BLE001 - decoders of untrusted files raise anything
                    reason, detail = imaging.rejection_reason(exc, self.decode)
                    errors[i] = f"{reason}: {detail}"
            if images:
                proba[rows] = self.predict_proba(images)
        return proba, errors


# --------------------------------------------------------------------------- command line


def _files(paths: Sequence[Path], extensions: frozenset[str]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = (p for p in path.rglob("*") if p.suffix.lower() in extensions
                     and not any(part.startswith(".") for part in p.relative_to(path).parts))
            files.extend(sorted(p for p in found if p.is_file()))
        else:
            files.append(path)
    return files


def _rows(paths: list[str], classes: list[str], proba: np.ndarray, errors: list[str | None]) -> list[dict[str, Any]]:
    rows = []
    for path, p, error in zip(paths, proba, errors):
        top = None if error else int(np.argmax(p))
        row = {PATH: path, LABEL: None if top is None else classes[top],
               PROBABILITY: None if top is None else float(p[top])}
        row |= {proba_column(c): (None if error else float(v)) for c, v in zip(classes, p)}
        rows.append(row | {ERROR: error})
    return rows


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transferlab predict", description=(
        "Classify image files with an exported ONNX model (onnxruntime; torch is not imported). Folders are "
        "searched recursively for the image extensions stored in the model."))
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or folders")
    parser.add_argument("--model", required=True, metavar="MODEL.onnx", help="a model written by `transferlab export`")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                        help=f"classes shown per image (default: {DEFAULT_TOP_K})")
    parser.add_argument("--out", type=Path, help="also write every probability to this CSV")
    return parser


def main(argv: Sequence[str]) -> int:
    """``transferlab predict PATH... --model MODEL.onnx [--top-k K] [--out CSV]`` (argv without ``predict``)."""
    args = parser().parse_args(argv)
    try:
        model = OnnxPredictor(args.model)
    except (OSError, ValueError) as exc:
        print(f"transferlab: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    files = [str(f) for f in _files(args.paths, model.extensions)]
    if not files:
        print(f"transferlab: error: no image files under {', '.join(map(str, args.paths))}", file=sys.stderr)
        return EXIT_USER_ERROR
    rows = _rows(files, model.classes, *model.classify(files))
    width = max(len(f) for f in files)
    print(f"{'path':<{width}}  top {min(args.top_k, len(model.classes))}")
    for row in rows:
        ranked = sorted(model.classes, key=lambda c: -row[proba_column(c)])[: args.top_k] if not row[ERROR] else []
        shown = f"error: {row[ERROR]}" if row[ERROR] else "  ".join(f"{c} {row[proba_column(c)]:.3f}" for c in ranked)
        print(f"{row[PATH]:<{width}}  {shown}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.tmp")  # atomic: io.atomic_path would import psutil
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, args.out)
    bad = [row for row in rows if row[ERROR]]
    for row in bad:
        print(f"transferlab: cannot classify {row[PATH]}: {row[ERROR]}", file=sys.stderr)
    return EXIT_USER_ERROR if len(bad) == len(rows) else EXIT_OK
