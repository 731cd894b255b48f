"""Ingest on 1 worker against all usable cores, on full-size JPEGs: seconds, speedup, identical outputs.

A folder of phone-sized photos (4032 x 3024 JPEG q90: bench/projects.photo_classes
crops, upscaled, with fresh noise so they do not compress like flat images) goes
through ``transferlab.data.ingest.ingest`` twice in this process: ``workers: 1``
then ``workers: null`` (the usable cores). The two output folders must be
byte-identical (images, manifest, report), else the script fails.

    .venv/bin/python bench/ingest.py [--images 200]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from projects import machine, photo_classes, tree, write_section
from transferlab.config import IngestParams
from transferlab.data.ingest import ingest, usable_cores

SECTION = "ingest"
FULL_SIZE = (4032, 3024)  # a 12 MP phone photo
CLASSES = 4
NOISE_STD = 8.0  # grey levels of fresh noise at full size


def full_size_photos(dest: Path, n: int) -> None:
    """``n`` 12 MP JPEGs in ``CLASSES`` class folders (upscaled photo crops plus noise)."""
    small = dest.parent / "small"
    photo_classes(small, -(-n // CLASSES), classes=CLASSES)
    rng = np.random.default_rng(0)
    for path in sorted(small.rglob("*.jpg"))[: n]:
        big = np.asarray(Image.open(path).convert("RGB").resize(FULL_SIZE), dtype=np.float32)
        big += rng.normal(0, NOISE_STD, big.shape).astype(np.float32)
        out = dest / path.parent.name / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(out, quality=90)
    shutil.rmtree(small)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="transferlab-ingest-"))
    try:
        raw = work / "raw"
        full_size_photos(raw, args.images)
        megabytes = sum(p.stat().st_size for p in raw.rglob("*.jpg")) / 2**20
        cores = usable_cores()
        seconds = {}
        for workers in (1, None):
            started = time.perf_counter()
            ingest(raw, work / f"out-{workers}", IngestParams(workers=workers))
            seconds[workers] = time.perf_counter() - started
        identical = tree(work / "out-1") == tree(work / "out-None")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    speedup = seconds[1] / seconds[None]
    print(json.dumps({"images": args.images, "workers": cores, "one_worker_s": round(seconds[1], 2),
                      "all_cores_s": round(seconds[None], 2), "speedup": round(speedup, 2),
                      "identical": identical}))
    if not identical:
        raise SystemExit("outputs differ between 1 worker and all cores")
    write_section(SECTION, "\n".join([
        "## Ingest: 1 worker against all cores (`bench/ingest.py`)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}. {args.images} JPEGs of "
        f"{FULL_SIZE[0]} x {FULL_SIZE[1]} ({megabytes:.0f} MB), params.yaml ingest defaults "
        f"(shorter side shrunk to {IngestParams().max_side} px, re-encoded JPEG).",
        "",
        "| workers | seconds | images/s |",
        "|---|---|---|",
        f"| 1 | {seconds[1]:.2f} | {args.images / seconds[1]:.1f} |",
        f"| {cores} (`workers: null`, the usable cores) | {seconds[None]:.2f} | {args.images / seconds[None]:.1f} |",
        "",
        f"Speedup {speedup:.2f}x; the two output folders (images, manifest.csv, report.json) are byte-identical.",
    ]))


if __name__ == "__main__":
    main()
