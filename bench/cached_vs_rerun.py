"""Benchmark: train the three heads on cached features vs re-running the frozen backbone.

One run measures, side by side, for the ``linear``, ``gap`` and ``svm`` heads:

* cached -- the project's way: ``features.extract`` runs the frozen backbone once
  per image, the heads train on the cached tensors (``load_part``).
  (a) head training only (the extraction is a one-off shared by every head and
  every re-training); (b) one extraction + that head's training.
* rerun -- the tutorials' way: every epoch, every training image is decoded,
  transformed and pushed through the frozen backbone again, batch by batch,
  right before the head's step. The SVM is not epoch-based: one pass + fit.

Both ways call the same optimisation code, ``transferlab.models.heads.train_module``,
with the same module, optimizer, batch size, seeds and a fixed number of epochs
(patience = epochs, so no early stop); only where a batch's features come from
differs. Results go to stdout and to this script's section of BENCHMARKS.md.

Run from the project root:  .venv/bin/python bench/cached_vs_rerun.py
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import pandas as pd
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from transferlab import config
from transferlab.models.backbones import DEFAULT_BACKBONE, Backbone, load_backbone
from transferlab.config import GapHeadParams, LinearHeadParams, SvmHeadParams
from transferlab.models.features import PartFeatures, extract, load_part

# The extract stage's own loader (decode, RGB, eval_transform): using it for the
# rerun way too guarantees both ways turn a file into a tensor identically.
from transferlab.models.features import load_batch as load_image_batch
from transferlab.models.heads import GapNet, LinearNet, SvmHead, TrainConfig, make_head, predict_logits, train_module

# The ingest stage's decoder (EXIF rotation, RGB, shorter side <= max_side):
# pre-shrinking with it gives the same files the pipeline's extract stage reads.
from transferlab.data.ingest import JPEG_QUALITY
from transferlab.data.ingest import decode_image as ingest_decode
from transferlab.io import atomic_write_text

T = TypeVar("T")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
from projects import find_hymenoptera  # noqa: E402

TRAIN_FOLDER = "train"
IMAGE_SUFFIXES = (".jpg", ".jpeg")
BENCHMARKS_FILE = PROJECT_ROOT / "BENCHMARKS.md"
BENCHMARKS_HEADER = "# Benchmarks"
SECTION_START = "<!-- bench:cached_vs_rerun:start -->"
SECTION_END = "<!-- bench:cached_vs_rerun:end -->"

DEFAULT_EPOCHS = 10
# Per-image forward cost of efficientnet_lite0 on the 2-core dev machine was
# ~0.025 s at batch 8-16 but ~0.04-0.05 s at 32-64 (cache pressure), so both
# ways use the cheap size: the tutorials' way would forward the whole training
# batch (64) at once and look slower still.
DEFAULT_BACKBONE_BATCH = 16
TARGET_SPEEDUP = 20.0  # acceptance: cached (a) total at least this many times faster
# "Similar" train accuracy: a couple of images out of a few hundred may flip
# because the cache stores float16 maps and the rerun feeds float32 ones.
SIMILAR_ACCURACY = 0.02
# An idle machine sits near 0; at this 1-minute load something else was competing for the cores.
CONTENDED_LOAD = 0.5
SPLIT_PART = "train"  # the whole benchmark set is one part of the feature store
TORCH_HEADS = ("linear", "gap")
SVM = "svm"


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Photo:
    path: Path  # relative to the prepared-images folder
    label: str


@dataclass(frozen=True)
class Dataset:
    root: Path  # prepared (pre-shrunk) images
    images: list[Photo]
    skipped: list[str]  # source files that are not JPEG

    @property
    def paths(self) -> list[Path]:
        return [self.root / image.path for image in self.images]

    @property
    def labels(self) -> list[str]:
        return [image.label for image in self.images]


def class_folder_root(data: Path) -> Path:
    """``<data>/train`` when present, else ``data`` itself (already a class-folder tree)."""
    train = data / TRAIN_FOLDER
    return train if train.is_dir() else data


def list_sources(root: Path, limit: int | None) -> tuple[list[tuple[Path, str]], list[str]]:
    """(file, label) pairs, sorted, at most ``limit`` per class; and the non-JPEG files skipped."""
    sources: list[tuple[Path, str]] = []
    skipped: list[str] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.is_file())
        skipped += [str(p.relative_to(root)) for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
        jpegs = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        sources += [(p, folder.name) for p in jpegs[:limit]]
    if not sources:
        raise SystemExit(f"no {'/'.join(IMAGE_SUFFIXES)} files in class folders under {root}")
    check_class_sizes(Counter(label for _, label in sources))
    return sources, skipped


def check_class_sizes(counts: Counter[str]) -> None:
    # The SVM head picks C by stratified k-fold CV: every class needs k images.
    folds = SvmHeadParams().cv
    if len(counts) < 2 or min(counts.values()) < folds:
        raise SystemExit(f"need >= 2 classes with >= {folds} images each (svm cv folds); got {dict(counts)}")


def preshrink(sources: list[tuple[Path, str]], out: Path, max_side: int) -> list[Photo]:
    """Decode and shrink every photo once, as the ingest stage does, before any clock starts."""
    images = []
    for i, (source, label) in enumerate(sources):
        image, _ = ingest_decode(source.read_bytes(), max_side)
        relative = Path(label) / f"{i:05d}.jpg"
        (out / label).mkdir(parents=True, exist_ok=True)
        image.save(out / relative, format="JPEG", quality=JPEG_QUALITY)
        images.append(Photo(relative, label))
    return images


def write_split(dataset: Dataset, split_csv: Path) -> None:
    rows = [{"path": i.path.as_posix(), "label": i.label, "part": SPLIT_PART} for i in dataset.images]
    pd.DataFrame(rows).to_csv(split_csv, index=False, lineterminator="\n")


# ------------------------------------------------------------------ feature sources


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def backbone_pass(
    paths: Sequence[Path], backbone: Backbone, batch: int, reduce: Callable[[Tensor], Tensor]
) -> Tensor:
    """Decode, transform and forward ``paths`` through the frozen backbone, ``batch`` at a time."""
    with torch.inference_mode():
        return torch.cat(
            [reduce(backbone.forward_features(load_image_batch(list(c), backbone))) for c in chunks(paths, batch)]
        )


def identity(maps: Tensor) -> Tensor:
    return maps


class RerunMaps:
    """Array-like over images whose rows are computed by the backbone on every access.

    ``train_module`` reads its shuffled batches as ``X[idx]``; handing it this
    object instead of the cached array makes every epoch decode, transform and
    forward each batch's images right before the head's step -- the tutorials'
    way -- while the optimisation code stays exactly the one the pipeline uses.
    """

    def __init__(self, paths: list[Path], backbone: Backbone, backbone_batch: int) -> None:
        self._paths = paths
        self._backbone = backbone
        self._batch = backbone_batch

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, idx: NDArray[np.int64]) -> NDArray[np.float32]:
        paths = [self._paths[i] for i in idx]
        return backbone_pass(paths, self._backbone, self._batch, identity).numpy()


# ------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Timing:
    wall: float  # perf_counter seconds: what the reader waits
    cpu: float  # this process's CPU seconds: less sensitive to other processes on the machine


def timed(fn: Callable[[], T]) -> tuple[T, Timing]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, Timing(time.perf_counter() - wall, time.process_time() - cpu)


def build_module(kind: str, shape: tuple[int, int, int], n_classes: int) -> nn.Module:
    # The same constructors (and arguments) LinearHead/GapHead._build_module use.
    if kind == "linear":
        p = LinearHeadParams()
        return LinearNet(math.prod(shape), p.hidden, n_classes, p.dropout)
    return GapNet(shape[0], n_classes, GapHeadParams().dropout)


def train_config(kind: str, epochs: int) -> TrainConfig:
    p: LinearHeadParams | GapHeadParams = LinearHeadParams() if kind == "linear" else GapHeadParams()
    # patience == epochs: train_module can never stop early, so both ways do equal work.
    return TrainConfig(p.lr, p.weight_decay, epochs, p.batch_size, patience=epochs, seed=p.random_state)


def train_torch_head(
    kind: str, X: NDArray[Any] | RerunMaps, y: NDArray[np.int64], shape: tuple[int, int, int], epochs: int
) -> nn.Module:
    """Build and train one torch head exactly as ``_TorchHead.fit`` does (same seeding)."""
    cfg = train_config(kind, epochs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        module = build_module(kind, shape, int(y.max()) + 1)
        # RerunMaps is duck-typed as the array train_module indexes batch by batch.
        result = train_module(module, cast(NDArray[Any], X), y, cfg)
    if len(result.history) != epochs:
        raise RuntimeError(f"{kind}: trained {len(result.history)} epochs, expected exactly {epochs}")
    return module


def fit_svm(X: NDArray[Any], labels: NDArray[Any]) -> SvmHead:
    return cast(SvmHead, make_head(SVM, dataclasses.asdict(SvmHeadParams())).fit(X, labels))


def encode(labels: Sequence[str], classes: list[str]) -> NDArray[np.int64]:
    return np.array([classes.index(label) for label in labels], dtype=np.int64)


# ---------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class HeadResult:
    head: str
    cached: Timing  # (a): load the cache + train
    rerun: Timing
    rerun_passes: int  # backbone passes over the training images in the rerun way
    acc_cached: float  # eval-mode train accuracy, both on the cached features
    acc_rerun: float
    agreement: float  # share of training images where both ways predict the same class


@dataclass(frozen=True)
class Context:
    dataset: Dataset
    backbone: Backbone
    store: Path
    classes: list[str]
    epochs: int
    backbone_batch: int


def torch_accuracies(kind: str, ctx: Context, cached: nn.Module, rerun: nn.Module) -> tuple[float, float, float]:
    part = load_part(ctx.store, SPLIT_PART, need_maps=True)
    y = torch.from_numpy(encode(list(part.labels), ctx.classes))
    batch = train_config(kind, ctx.epochs).batch_size
    preds = [predict_logits(m, cast(NDArray[Any], part.maps), batch).argmax(dim=1) for m in (cached, rerun)]
    acc = [float((p == y).double().mean()) for p in preds]
    return acc[0], acc[1], float((preds[0] == preds[1]).double().mean())


def check_alignment(ctx: Context) -> None:
    # The sanity figures compare row i of the cache with image i of the rerun way.
    cached = list(load_part(ctx.store, SPLIT_PART, need_maps=False).labels)
    if cached != ctx.dataset.labels:
        raise RuntimeError("the feature store's rows are not in the order of the benchmark's images")


def bench_torch_head(kind: str, ctx: Context, shape: tuple[int, int, int]) -> HeadResult:
    def cached() -> nn.Module:
        part = load_part(ctx.store, SPLIT_PART, need_maps=True)
        y = encode(list(part.labels), ctx.classes)
        return train_torch_head(kind, cast(NDArray[Any], part.maps), y, shape, ctx.epochs)

    def rerun() -> nn.Module:
        source = RerunMaps(ctx.dataset.paths, ctx.backbone, ctx.backbone_batch)
        return train_torch_head(kind, source, encode(ctx.dataset.labels, ctx.classes), shape, ctx.epochs)

    cached_module, cached_time = timed(cached)
    rerun_module, rerun_time = timed(rerun)
    accuracies = torch_accuracies(kind, ctx, cached_module, rerun_module)
    return HeadResult(kind, cached_time, rerun_time, ctx.epochs, *accuracies)


def bench_svm(ctx: Context) -> HeadResult:
    def cached() -> tuple[SvmHead, PartFeatures]:
        part = load_part(ctx.store, SPLIT_PART, need_maps=False)
        return fit_svm(part.pooled, part.labels), part

    def rerun() -> SvmHead:
        pooled = backbone_pass(ctx.dataset.paths, ctx.backbone, ctx.backbone_batch, ctx.backbone.pool)
        return fit_svm(pooled.numpy(), np.asarray(ctx.dataset.labels, dtype=object))

    (cached_head, part), cached_time = timed(cached)
    rerun_head, rerun_time = timed(rerun)
    preds = [head.predict(part.pooled) for head in (cached_head, rerun_head)]
    acc = [float(np.mean(p == part.labels)) for p in preds]
    return HeadResult(SVM, cached_time, rerun_time, 1, acc[0], acc[1], float(np.mean(preds[0] == preds[1])))


def feature_difference(ctx: Context) -> tuple[float, float]:
    """Max |cached - fresh| over the first backbone batch, and max |fresh| for scale.

    Expected: float16 rounding of the cache, nothing more -- which also shows
    the cache rows are in the same order as the images the rerun way reads.
    """
    part = load_part(ctx.store, SPLIT_PART, need_maps=True)
    if part.maps is None:
        raise RuntimeError("the feature store has no maps")
    n = min(ctx.backbone_batch, len(ctx.dataset.images))
    fresh = backbone_pass(ctx.dataset.paths[:n], ctx.backbone, ctx.backbone_batch, identity).numpy()
    return float(np.abs(part.maps[:n].astype(np.float32) - fresh).max()), float(np.abs(fresh).max())


# -------------------------------------------------------------------- machine facts


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{v:.2f}" for v in load) + " (1/5/15 min)"


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def command_line() -> str:
    python = Path(sys.executable)
    shown = python.relative_to(PROJECT_ROOT) if python.is_relative_to(PROJECT_ROOT) else python
    script = Path(__file__).resolve().relative_to(PROJECT_ROOT)
    return shlex.join([str(shown), str(script), *sys.argv[1:]])


# ------------------------------------------------------------------------ reporting


@dataclass(frozen=True)
class Report:
    command: str
    facts: dict[str, str]
    dataset: Dataset
    source_root: Path
    max_side: int
    backbone: str
    epochs: int
    backbone_batch: int
    extract: Timing
    heads: list[HeadResult]
    feature_diff: tuple[float, float]  # max |cached - fresh|, max |fresh|
    load_start: float  # 1-minute load average when the run began


def seconds(value: float) -> str:
    return f"{value:.2f}"


def ratio(num: float, den: float) -> str:
    return f"{num / den:.1f}x" if den > 0 else "n/a"


def table(r: Report) -> list[str]:
    rows = [
        "| head | backbone passes: cached / rerun | cached (a) head only [s] | cached (b) extract + head [s] "
        "| rerun [s] | rerun / (a) | rerun / (b) | train acc cached | train acc rerun | same predictions |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for h in r.heads:
        a, rerun = h.cached.wall, h.rerun.wall
        b = r.extract.wall + a
        rows.append(
            f"| {h.head} | 1 (shared) / {h.rerun_passes} | {seconds(a)} | {seconds(b)} "
            f"| {seconds(rerun)} | {ratio(rerun, a)} | {ratio(rerun, b)} "
            f"| {h.acc_cached:.3f} | {h.acc_rerun:.3f} | {h.agreement:.3f} |"
        )
    a, b, rerun = totals(r)
    passes = sum(h.rerun_passes for h in r.heads)
    rows.append(
        f"| **total** | 1 / {passes} | {seconds(a)} | {seconds(b)} | {seconds(rerun)} "
        f"| **{ratio(rerun, a)}** | {ratio(rerun, b)} | | | |"
    )
    return rows


def totals(r: Report, clock: str = "wall") -> tuple[float, float, float]:
    """(a), (b) with the extraction counted once for all heads, and rerun; on ``clock`` ("wall" or "cpu")."""
    a = sum(getattr(h.cached, clock) for h in r.heads)
    return a, getattr(r.extract, clock) + a, sum(getattr(h.rerun, clock) for h in r.heads)


def verdicts(r: Report) -> list[str]:
    a, _, rerun = totals(r)
    cpu_a, cpu_b, cpu_rerun = totals(r, "cpu")
    speedup = rerun / a if a > 0 else math.inf
    holds = "HOLDS" if speedup >= TARGET_SPEEDUP else "DOES NOT HOLD"
    similar = all(abs(h.acc_cached - h.acc_rerun) <= SIMILAR_ACCURACY for h in r.heads)
    return [
        f"- **Target** (cached way >= {TARGET_SPEEDUP:.0f}x faster, total of the three heads by (a)): "
        f"**{holds}** -- {speedup:.1f}x.",
        f"- Same totals on this process's CPU seconds (less sensitive to other load on the machine): "
        f"(a) {cpu_a:.1f} s, (b) {cpu_b:.1f} s, rerun {cpu_rerun:.1f} s -> rerun / (a) {ratio(cpu_rerun, cpu_a)}, "
        f"rerun / (b) {ratio(cpu_rerun, cpu_b)}.",
        f"- **Sanity** (train accuracy of the two ways within {SIMILAR_ACCURACY:.2f} for every head): "
        f"**{'yes' if similar else 'NO'}**; max |cached - fresh| feature value over one batch: "
        f"{r.feature_diff[0]:.2g}, for values up to {r.feature_diff[1]:.3g} (the cache stores float16 maps, "
        "the rerun feeds float32).",
        *contention_note(r),
    ]


def contention_note(r: Report) -> list[str]:
    if r.load_start < CONTENDED_LOAD:
        return []
    return [
        f"- Other processes were using the CPU (1-minute load {r.load_start:.2f} at start, {usable_cores()} "
        "cores): the wall-clock seconds include that competition and are noisier than on an idle machine; "
        "the CPU-seconds line above is less affected."
    ]


def data_note(r: Report) -> str:
    counts = Counter(r.dataset.labels)
    per_class = ", ".join(f"{label} {n}" for label, n in sorted(counts.items()))
    skipped = f"; skipped (not JPEG): {', '.join(r.dataset.skipped)}" if r.dataset.skipped else ""
    return (
        f"- Data: {len(r.dataset.images)} photos ({per_class}) from `{r.source_root}`{skipped}. Before any clock "
        f"starts every photo is decoded and shrunk once with the ingest stage's decoder (shorter side <= "
        f"{r.max_side} px, `ingest.max_side`) and saved as JPEG q{JPEG_QUALITY}, like `data/prepared`; both ways "
        f"then decode these same small files with the extract stage's loader (RGB, eval transform: "
        f"resize + centre crop + normalise), so 12 MP JPEG decoding does not dominate either way."
    )


def method_notes(r: Report) -> list[str]:
    lin, gap, svm = LinearHeadParams(), GapHeadParams(), SvmHeadParams()
    return [
        data_note(r),
        f"- Backbone: `{r.backbone}` (ImageNet weights), eval mode, `requires_grad=False`, under "
        f"`torch.inference_mode()`, {r.backbone_batch} images per forward in both ways (the rerun way splits "
        f"each head batch into backbone chunks of that size).",
        f"- Cached: (a) = `load_part` of the cache + training; (b) = (a) + one `features.extract` run "
        f"({seconds(r.extract.wall)} s: decode, transform, forward, write float16 maps and pooled vectors). "
        "Per head, (b) charges the whole extraction to that head; the total counts it once, as the pipeline "
        "runs it once.",
        f"- Rerun: torch heads decode, transform and forward every training image every epoch, batch by batch, "
        f"right before the head's step ({r.epochs} passes each); the SVM is not epoch-based: one pass + fit.",
        f"- Same training code both ways: `transferlab.models.heads.train_module` (AdamW, shuffled batches of "
        f"{lin.batch_size}, fixed {r.epochs} epochs -- patience = epochs, so no early stop; it keeps the epoch "
        f"with the lowest running train loss, the same rule both ways), same seeds for init, dropout and shuffling. "
        f"linear = `LinearNet` (flatten -> {lin.hidden} -> classes, dropout {lin.dropout}, lr {lin.lr:g}); gap = "
        f"`GapNet` (lr {gap.lr:g}); svm = `SvmHead` with the `SvmHeadParams` defaults (C chosen from "
        f"{svm.C_grid} by {svm.cv}-fold CV, then Platt calibration), fitted on pooled vectors.",
        "- Train folder only, no validation images: the tutorials also forward the val images every epoch, "
        "so the rerun figures here understate their cost and the ratios are conservative.",
        "- Train accuracy: eval-mode accuracy of each way's trained head on the cached training features "
        "(the same input for both, computed after the clocks stop); 'same predictions' is the share of images "
        "where the two heads agree.",
    ]


def markdown(r: Report) -> str:
    facts = [f"- {key}: {value}" for key, value in r.facts.items()]
    lines = [
        "## Cached features vs backbone re-run every epoch",
        "",
        "Produced by `bench/cached_vs_rerun.py`; run from the project root:",
        "",
        "```",
        r.command,
        "```",
        "",
        *facts,
        "",
        *table(r),
        "",
        *verdicts(r),
        "",
        *method_notes(r),
    ]
    return "\n".join(lines) + "\n"


def upsert_section(existing: str | None, body: str) -> str:
    """Put ``body`` between this script's markers, leaving everything else in the file untouched."""
    block = f"{SECTION_START}\n{body.rstrip()}\n{SECTION_END}"
    if existing is None:
        return f"{BENCHMARKS_HEADER}\n\n{block}\n"
    starts, ends = existing.count(SECTION_START), existing.count(SECTION_END)
    if starts == ends == 0:
        return f"{existing.rstrip()}\n\n{block}\n"
    start, end = existing.find(SECTION_START), existing.find(SECTION_END)
    if starts != 1 or ends != 1 or end < start:
        # Guessing which span is ours could delete another script's section.
        raise SystemExit(f"malformed {SECTION_START} / {SECTION_END} markers; fix them by hand")
    return existing[:start] + block + existing[end + len(SECTION_END) :]


def write_section(path: Path, body: str) -> None:
    # Read right before the atomic rename, to keep the window for another
    # script's concurrent update of its own section as short as possible.
    existing = path.read_text(encoding="utf-8") if path.exists() else None
    atomic_write_text(path, upsert_section(existing, body))


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=find_hymenoptera(), help="dataset root; its train/ class folders are read"
    )
    parser.add_argument("--limit", type=int, default=None, help="at most N images per class (default: all)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="epochs for the torch heads")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument(
        "--backbone-batch", type=int, default=DEFAULT_BACKBONE_BATCH, help="images per backbone forward, both ways"
    )
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--benchmarks", type=Path, default=BENCHMARKS_FILE, help="Markdown file to update")
    args = parser.parse_args(argv)
    if args.data is None:
        parser.error("no local copy of hymenoptera found: pass --data DIR or set TRANSFERLAB_HYMENOPTERA")
    for name in ("limit", "epochs", "threads", "backbone_batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def prepare(args: argparse.Namespace, workdir: Path) -> tuple[Dataset, Path, int]:
    source_root = class_folder_root(args.data.resolve())
    sources, skipped = list_sources(source_root, args.limit)
    max_side = config.section("ingest", PROJECT_ROOT / "params.yaml").max_side
    prepared = workdir / "prepared"
    dataset = Dataset(prepared, preshrink(sources, prepared, max_side), skipped)
    return dataset, source_root, max_side


def frozen_backbone(name: str) -> Backbone:
    backbone = load_backbone(name)
    backbone.module.eval()  # BatchNorm on its ImageNet statistics, as in extract()
    backbone.module.requires_grad_(False)
    return backbone


def warm_up(dataset: Dataset, backbone: Backbone, batch: int) -> tuple[int, int, int]:
    """One untimed forward, so neither way pays one-off allocation costs; returns the map shape."""
    maps = backbone_pass(dataset.paths[:batch], backbone, batch, identity)
    return cast(tuple[int, int, int], tuple(maps.shape[1:]))


def run(args: argparse.Namespace, workdir: Path, facts: dict[str, str], load_start: float) -> Report:
    dataset, source_root, max_side = prepare(args, workdir)
    backbone = frozen_backbone(args.backbone)
    shape = warm_up(dataset, backbone, args.backbone_batch)
    write_split(dataset, workdir / "split.csv")
    store = workdir / "features"
    _, extract_time = timed(
        lambda: extract(backbone, workdir / "split.csv", dataset.root, store, args.backbone_batch, keep_maps=True)
    )
    ctx = Context(dataset, backbone, store, sorted(set(dataset.labels)), args.epochs, args.backbone_batch)
    check_alignment(ctx)
    heads = [*(bench_torch_head(kind, ctx, shape) for kind in TORCH_HEADS), bench_svm(ctx)]
    return Report(
        command_line(), facts, dataset, source_root, max_side, args.backbone, args.epochs,
        args.backbone_batch, extract_time, heads, feature_difference(ctx), load_start,
    )


def machine_facts(load_start: tuple[float, float, float]) -> dict[str, str]:
    return {
        "Date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "CPU": cpu_model(),
        "Cores": f"{os.cpu_count()} logical, {usable_cores()} usable by this process",
        "torch": torch.__version__,
        "torch threads (both ways)": str(torch.get_num_threads()),
        "Load average at start": load_average(load_start),
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    facts = machine_facts(load_start)
    print("\n".join(f"{k}: {v}" for k, v in facts.items()), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-cached-vs-rerun-") as tmp:
        report = run(args, Path(tmp), facts, load_start[0])
    end = {"Load average at end": load_average(os.getloadavg())}
    report = dataclasses.replace(report, facts={**report.facts, **end})
    body = markdown(report)
    print("\n" + body)
    write_section(args.benchmarks, body)
    print(f"wrote section {SECTION_START} of {args.benchmarks}")


if __name__ == "__main__":
    main()
