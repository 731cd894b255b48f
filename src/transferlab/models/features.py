"""Run a frozen backbone once per image and cache what the heads need.

Layout of one backbone's feature store (``data/features/<backbone>/``)::

    manifest.json            backbone, weights id, transform, shapes, dtypes,
                             library versions, hash of data/split.csv
    <part>.index.csv         image id (prepared path) and label, row-aligned
    <part>.pooled.safetensors  pooled vectors (N x C float32) + label indices
    <part>.maps.npy          last conv feature maps (N x C x H x W float16)
    <part>.blocks.safetensors  train and val only: every named block's pooled
                             output (N x C_block float32) and the ImageNet
                             classifier's top-1 probability, for the probe

Maps are written batch by batch into a memory-mapped ``.npy`` and freed heap
pages go back to the OS every few batches, so peak memory does not grow with
the dataset (only the small pooled vectors are held).
Every file loads without pickle (safetensors, ``np.load(allow_pickle=False)``).
"""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pandas as pd
import torch
import torch.distributed
from numpy.lib.format import open_memmap
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from transferlab.data.images import image_loader
from transferlab.data.imaging import open_rgb
from transferlab.device import autocast, conv_net_to, images_to
from transferlab.distributed.ranks import SINGLE, Ranks
from transferlab.models.heads.registry import specs
from transferlab.io import atomic_dir, atomic_write_json, sha256_file
from transferlab.memory import release_freed_memory

if TYPE_CHECKING:  # the heads' stages read stores without torchvision or timm (seconds of imports)
    from transferlab.models.backbones import Backbone

log = logging.getLogger(__name__)
MAPS_DTYPE = np.float16  # halves the cache; heads compute in float32
POOLED_DTYPE = torch.float32
MANIFEST = "manifest.json"
# Batches between returns of freed heap pages to the OS (transferlab.memory): after every batch the
# next one faults its pages in afresh (~7% slower on 2 cores); every 8 keeps the peak flat for ~1%.
RELEASE_EVERY = 8
# The parts whose every block is kept for the probe stage: it chooses a strategy, so test is never looked at.
# Keeping them here costs the pooling of each block's output in the same forward pass (the last block's output
# is the maps); a probe of its own would forward train and val a second time (about as long as this stage).
PROBE_PARTS = ("train", "val")
TOP1 = "imagenet_top1"
# extract.weights "none" builds a randomly initialised network (tests, baselines): seeded, so reruns and
# every rank of a distributed run build the same one (load_backbone under torch.random.fork_rng)
RANDOM_INIT_SEED = 0


@dataclass(frozen=True)
class PartFeatures:
    """One split part loaded from a feature store."""

    ids: list[str]
    labels: np.ndarray  # label names, row-aligned
    pooled: np.ndarray  # N x C float32
    maps: np.ndarray | None  # N x C x H x W float16, memory-mapped; None when not kept


@dataclass(frozen=True)
class BlockVectors:
    """Pooled block outputs of one part's images, row-aligned with its index."""

    blocks: list[str]  # input to output
    vectors: list[np.ndarray]  # per block: N x C_block float32
    top1: np.ndarray  # N: the ImageNet classifier's top-1 softmax probability


def load_batch(paths: list[Path], backbone: Backbone) -> torch.Tensor:
    """One batch through the one image pipeline, in this process (tests, small callers)."""
    return torch.stack([backbone.eval_transform(open_rgb(p)) for p in paths])


def _versions() -> dict[str, str]:
    import timm
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
    }


def _forward(backbone: Backbone, images: torch.Tensor,
             probe: bool) -> tuple[torch.Tensor, tuple[list[torch.Tensor], torch.Tensor] | None]:
    """One batch: the maps (float32, CPU) and, for the probe's parts, each block's pooled output and the top-1.

    The probe's parts run block by block (the last block's output is forward_features' maps,
    tests/test_backbones.py), so keeping every block costs a pooling each, not a second forward.
    """
    if not probe:
        return backbone.forward_features(images).float().cpu().contiguous(), None
    pooled, last = [], images
    for _, last in backbone.block_outputs(images):
        pooled.append(backbone.pool(last).float().cpu())
    top1 = torch.softmax(backbone.imagenet_logits_from_maps(last).float(), dim=1).amax(dim=1).cpu()
    return last.float().cpu().contiguous(), (pooled, top1)


def _batches(n: int, batch_size: int) -> list[range]:
    return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _extract_part(
    backbone: Backbone,
    rows: pd.DataFrame,
    images_root: Path,
    out: Path | None,
    part: str,
    batch_size: int,
    keep_maps: bool,
    classes: list[str],
    device: torch.device,
    num_workers: int,
    ranks: Ranks,
    tally: dict[str, int],
    offset: int = 0,
) -> dict[str, Any]:
    """One part: batch ``j`` of the part is forwarded by rank ``(offset + j) % world``; rank 0 writes them in order.

    ``offset``: the batches of the parts before this one, so the round-robin goes on across parts and a
    small part (val, test: often one batch) does not always fall to rank 0.

    Sharding whole batches (not images) keeps every batch exactly the one a
    single process forwards, so the store is bitwise the same for any number of
    ranks. Rank 0 collects one round of batches (one per rank) at a time: memory
    stays one round of maps, whatever the dataset.
    """
    paths = [images_root / p for p in rows["path"]]
    batches = _batches(len(paths), batch_size)
    first = offset % ranks.world  # the rank that forwards this part's first batch
    mine = batches[(ranks.rank - first) % ranks.world :: ranks.world]
    # every batch but the part's last is full, so a loader over my batches' images yields exactly my batches
    loader = image_loader([(paths[i], 0) for b in mine for i in b], backbone.eval_transform, batch_size, device,
                          num_workers)
    maps_file = None
    maps_shape: list[int] | None = None
    pooled: list[torch.Tensor] = []
    probe = part in PROBE_PARTS
    names = [name for name, _ in backbone.blocks()] if probe else []
    blocks: list[list[torch.Tensor]] = [[] for _ in names]
    top1: list[torch.Tensor] = []
    written = np.zeros(len(paths), dtype=np.int64)  # rank 0: how often each row arrived (must be once)
    rounds = -(-(first + len(batches)) // ranks.world)
    desc = f"extract {backbone.name} [{part}]"
    with torch.inference_mode(), autocast(device):
        it = iter(loader)
        for k in tqdm(range(rounds), desc=desc, unit="round" if ranks.distributed else "batch",
                      disable=not ranks.is_main):
            j = k * ranks.world + ranks.rank - first
            mine_now = None
            if 0 <= j < len(batches):
                images, _ = next(it)
                fmap, probed = _forward(backbone, images_to(images, device), probe)
                mine_now = (j, backbone.pool(fmap).to(POOLED_DTYPE),
                            fmap.numpy().astype(MAPS_DTYPE) if keep_maps else None, probed)
                tally[part] = tally.get(part, 0) + len(images)
                del images, fmap
            arrived = ranks.gather(mine_now)
            if arrived is None:  # not rank 0: it writes nothing
                continue
            for j, vectors, fmap, probed in sorted((a for a in arrived if a is not None), key=lambda a: a[0]):
                rows_j = batches[j]
                written[rows_j.start : rows_j.stop] += 1
                if keep_maps:
                    if maps_file is None:
                        maps_shape = [len(paths), *fmap.shape[1:]]
                        maps_file = open_memmap(out / f"{part}.maps.npy", mode="w+", dtype=MAPS_DTYPE,
                                                shape=tuple(maps_shape))
                    maps_file[rows_j.start : rows_j.stop] = fmap
                pooled.append(vectors)
                if probed is not None:
                    for i, block_vectors in enumerate(probed[0]):
                        blocks[i].append(block_vectors)
                    top1.append(probed[1])
            if (k + 1) % RELEASE_EVERY == 0:  # else the heap fragments and the peak grows with the dataset
                release_freed_memory()
    if out is None:
        return {}
    if not (written == 1).all():  # a sharding bug must never write a store with a row missing or doubled
        raise RuntimeError(f"extract {part}: rows forwarded other than once: {np.flatnonzero(written != 1)[:10]}")
    if maps_file is not None:
        maps_file.flush()
        del maps_file
    vectors = torch.cat(pooled) if pooled else torch.empty(0, backbone.num_features)
    label_idx = torch.tensor([classes.index(lbl) for lbl in rows["label"]], dtype=torch.int64)
    save_file({"pooled": vectors.contiguous(), "labels": label_idx}, str(out / f"{part}.pooled.safetensors"))
    if probe:
        save_file({**{name: torch.cat(parts) if parts else torch.empty(0) for name, parts in zip(names, blocks)},
                   TOP1: torch.cat(top1) if top1 else torch.empty(0)}, str(out / f"{part}.blocks.safetensors"))
    rows[["path", "label"]].to_csv(out / f"{part}.index.csv", index=False, lineterminator="\n")
    return {
        "n": len(paths),
        "pooled_shape": list(vectors.shape),
        "maps_shape": maps_shape,
        "probe_blocks": names if probe else None,
    }


def extract(
    backbone: Backbone,
    split_csv: Path,
    images_root: Path,
    out_dir: Path,
    batch_size: int,
    keep_maps: bool = True,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    ranks: Ranks = SINGLE,
    tally: dict[str, int] | None = None,
) -> dict[str, Any] | None:
    """Write the feature store for ``backbone`` atomically; return its manifest.

    ``device``: where the backbone runs (``compute.device``, resolved); the
    stored tensors are always CPU tensors, so the store loads anywhere.
    With several ``ranks`` (a torchrun world) each forwards a disjoint shard of
    every part and rank 0 writes the store, the same bytes as one process
    writes; the other ranks return None. ``tally`` (part -> images) counts what
    this rank forwarded.
    """
    tally = {} if tally is None else tally
    device = torch.device(device)
    split = pd.read_csv(split_csv, dtype={"label": str}, keep_default_na=False)
    classes = sorted(split["label"].unique())
    if ranks.distributed:  # every rank forwards rank 0's network, whatever each node loaded
        for tensor in backbone.module.state_dict().values():
            torch.distributed.broadcast(tensor, src=0, group=ranks.group)
    backbone.module.eval()  # BatchNorm must use its ImageNet statistics, never batch ones
    backbone.module.requires_grad_(False)  # frozen: nothing here trains, and the counts say so
    conv_net_to(backbone.module, device)

    def parts_in_order(out: Path | None) -> Iterator[tuple[str, dict[str, Any]]]:
        offset = 0  # batches before this part: the ranks' round-robin goes on across parts
        for part, rows in split.groupby("part", sort=True):
            yield str(part), _extract_part(backbone, rows.reset_index(drop=True), images_root, out, str(part),
                                           batch_size, keep_maps, classes, device, num_workers, ranks, tally,
                                           offset)
            offset += -(-len(rows) // batch_size)

    if not ranks.is_main:  # it forwards its shard; rank 0 writes
        for _ in parts_in_order(None):
            pass
        return None
    parts: dict[str, Any] = {}
    with atomic_dir(out_dir) as tmp:
        parts.update(parts_in_order(tmp))
        manifest = {
            "backbone": backbone.name,
            "weights": backbone.weights_id,
            "transform": backbone.transform_config(),
            "classes": classes,
            "parts": parts,
            "images_forwarded": sum(p["n"] for p in parts.values()),
            "dtypes": {"maps": np.dtype(MAPS_DTYPE).name if keep_maps else None, "pooled": "float32"},
            "keep_maps": keep_maps,
            "split_sha256": sha256_file(split_csv),
            "versions": _versions(),
            "param_counts": backbone.param_counts(),
        }
        atomic_write_json(tmp / MANIFEST, manifest)
    log.info("extract %s: %d images forwarded, once each", backbone.name, manifest["images_forwarded"])
    return manifest


def read_manifest(store: Path) -> dict[str, Any]:
    return json.loads((Path(store) / MANIFEST).read_text())


def load_part(store: Path, part: str, need_maps: bool) -> PartFeatures:
    """Load one part; ``need_maps`` fails clearly when maps were not kept."""
    store = Path(store)
    manifest = read_manifest(store)
    tensors = load_file(str(store / f"{part}.pooled.safetensors"))
    index = pd.read_csv(store / f"{part}.index.csv", dtype={"label": str}, keep_default_na=False)
    maps = None
    if need_maps:
        if not manifest["keep_maps"]:
            map_heads = ", ".join(s.name for s in specs() if s.reads_maps)
            pooled_heads = ", ".join(s.name for s in specs() if not s.reads_maps)
            raise FileNotFoundError(
                f"{store}: feature maps were not kept (extract.keep_maps: false); the heads that read maps "
                f"({map_heads}) need them: set extract.keep_maps: true or train heads on pooled vectors "
                f"({pooled_heads})"
            )
        maps = np.load(store / f"{part}.maps.npy", mmap_mode="r", allow_pickle=False)
    classes = manifest["classes"]
    labels = np.array([classes[i] for i in tensors["labels"].tolist()], dtype=object)
    return PartFeatures(list(index["path"]), labels, tensors["pooled"].numpy(), maps)


def load_blocks(store: Path, part: str) -> BlockVectors:
    """The probe's vectors of one part (train or val): every block's pooled output and the ImageNet top-1."""
    store = Path(store)
    if part not in PROBE_PARTS:
        raise ValueError(f"block vectors are kept for {PROBE_PARTS} only, not {part!r}")
    names = read_manifest(store)["parts"][part].get("probe_blocks")
    if names is None:
        raise FileNotFoundError(f"{store}: no block vectors for {part!r}; rerun extract (dvc repro)")
    tensors = load_file(str(store / f"{part}.blocks.safetensors"))
    return BlockVectors(names, [tensors[name].numpy() for name in names], tensors[TOP1].numpy())


def class_counts(store: Path, part: str) -> dict[str, int]:
    """Images per class in one part of a feature store (its index only: no tensors are read)."""
    index = pd.read_csv(Path(store) / f"{part}.index.csv", dtype={"label": str}, keep_default_na=False)
    return {str(k): int(v) for k, v in index["label"].value_counts().sort_index().items()}
