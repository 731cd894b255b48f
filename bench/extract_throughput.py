"""The extract stage's images per second against the backbone's own ceiling, side by side in one process.

- ceiling: ``forward_features`` + pooling on tensors already decoded and
  transformed in memory (nothing else runs), batch size ``extract.batch_size``,
  in channels_last as the stage runs it (device.IMAGE_FORMAT);
- extract: ``transferlab.models.features.extract``, the stage's own code, on the
  same images as JPEG files (as ingest writes them: 512 x 384), with
  ``compute.num_workers`` DataLoader workers decoding while the backbone runs,
  maps and pooled vectors written to a feature store;
- NCHW: the ceiling again in the default layout, which the stage used before
  (it keeps channels_last because this measures slower).

Same torch threads, batch size and backbone for all. Prints one JSON line with
``extract_over_ceiling`` and writes the ``extract_throughput`` section of BENCHMARKS.md.

    .venv/bin/python bench/extract_throughput.py [--images 512] [--backbone efficientnet_lite0] [--num-workers N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from projects import PREPARED_SIZE, machine, prepared_photos, write_section
from transferlab.config import ComputeParams, ExtractParams
from transferlab.data.imaging import open_rgb
from transferlab.device import decode_workers
from transferlab.models.backbones import load_backbone
from transferlab.models.features import extract

SECTION = "extract_throughput"
WARMUP_BATCHES = 2  # one-off costs (allocator, oneDNN kernel choice) kept out of the ceiling
REPEATS = 2  # the ceiling is the best pass: what the backbone can do, not a noisy average


def forward_rate(backbone, batches: list[torch.Tensor], channels_last: bool) -> float:
    """Images per second of forward_features + pool on preloaded batches (the best of ``REPEATS`` passes)."""
    module = backbone.module.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    prepared = [b.contiguous(memory_format=fmt) for b in batches]
    seconds = float("inf")
    with torch.inference_mode():
        for b in prepared[:WARMUP_BATCHES]:
            backbone.pool(backbone.forward_features(b))
        for _ in range(REPEATS):
            started = time.perf_counter()
            for b in prepared:
                backbone.pool(backbone.forward_features(b))
            seconds = min(seconds, time.perf_counter() - started)
    module.to(memory_format=torch.contiguous_format)
    return sum(len(b) for b in prepared) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--num-workers", type=int, default=decode_workers(ComputeParams().num_workers, "cpu"),
                        help="DataLoader workers (default: compute.num_workers's default on the CPU)")
    args = parser.parse_args()
    batch_size, workers = ExtractParams().batch_size, args.num_workers
    work = Path(tempfile.mkdtemp(prefix="transferlab-extract-"))
    try:
        images = work / "images"
        paths = prepared_photos(images, args.images)
        split = pd.DataFrame({"path": [p.relative_to(images).as_posix() for p in paths],
                              "label": [p.parent.name for p in paths], "part": "train"})
        split.to_csv(work / "split.csv", index=False)
        backbone = load_backbone(args.backbone)
        backbone.module.eval().requires_grad_(False)
        tensors = torch.stack([backbone.eval_transform(open_rgb(p)) for p in paths])
        batches = list(tensors.split(batch_size))
        ceiling = forward_rate(backbone, batches, channels_last=False)
        ceiling_cl = forward_rate(backbone, batches, channels_last=True)
        started = time.perf_counter()
        extract(backbone, work / "split.csv", images, work / "store", batch_size, keep_maps=True,
                device="cpu", num_workers=workers)
        stage_rate = len(paths) / (time.perf_counter() - started)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures = {"backbone": args.backbone, "images": len(paths), "batch_size": batch_size, "num_workers": workers,
               "threads": torch.get_num_threads(), "ceiling_img_s": round(ceiling, 2),
               "ceiling_channels_last_img_s": round(ceiling_cl, 2), "extract_img_s": round(stage_rate, 2),
               "extract_over_ceiling": round(stage_rate / ceiling_cl, 3),
               "channels_last_over_contiguous": round(ceiling_cl / ceiling, 3)}
    print(json.dumps(figures))
    write_section(SECTION, "\n".join([
        "## Extract against the backbone's ceiling (`bench/extract_throughput.py`)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}; torch threads {figures['threads']}, "
        f"{args.backbone}, batch {batch_size}, {len(paths)} JPEGs of {PREPARED_SIZE[0]} x {PREPARED_SIZE[1]}, "
        f"compute.num_workers {workers}.",
        "",
        "| what | images/s |",
        "|---|---|",
        f"| ceiling: forward_features + pool on preloaded tensors, channels_last | {ceiling_cl:.2f} |",
        f"| the same in NCHW (the former layout) | {ceiling:.2f} (channels_last {ceiling_cl / ceiling:.2f}x) |",
        f"| extract stage code (decode in workers, forward, write maps + pooled) | {stage_rate:.2f} |",
        "",
        f"`extract_over_ceiling` = {stage_rate / ceiling_cl:.3f} (the stage over the channels_last ceiling).",
    ]))


if __name__ == "__main__":
    main()
