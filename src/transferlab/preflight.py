"""Checks that run before any stage does work, on every ``dvc repro`` (the ``preflight`` stage).

DVC re-runs a stage only when the params keys it lists change, so a typo in
``params.yaml`` (``finetun:``, ``train_head.lineer:``) would otherwise go
unnoticed for ever. Here the whole file is validated, sections, keys and the
rules across sections, including those that need the backbone's architecture
(``finetune.last_blocks``); the dataset must be where ingest looks; and a
tracking server must answer. Each failure is one line naming what to change.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transferlab import block_layouts
from transferlab.config import Params, ParamsError, load
from transferlab.errors import UserError
from transferlab.io import atomic_write_json, atomic_write_text

# layouts of backbones the package does not ship (timm- names, other library versions), once built
BLOCKS_CACHE = Path(".dvc/tmp/transferlab-blocks.json")
OK_TEXT = "params.yaml, the dataset and the MLflow store were checked before this pipeline ran\n"


class DataMissingError(UserError):
    """The raw dataset is not where ingest reads it."""


def block_names(backbone: str, cache: Path = BLOCKS_CACHE) -> list[str]:
    """The backbone's block names: the project's cache, else the layouts shipped with the package, else built
    (that needs torch: seconds) and cached. Both count only under the running library versions and adapter
    code (block_layouts.layout_key), so a stale one is never read."""
    key = block_layouts.layout_key()
    stored = json.loads(cache.read_text()) if cache.is_file() else {}
    if stored.get("versions") != key:
        stored = {"versions": key, "blocks": {}}
    if backbone in stored["blocks"]:
        return list(stored["blocks"][backbone])
    shipped = block_layouts.shipped(key)
    if backbone in shipped:
        return list(shipped[backbone])
    from transferlab.models.backbones import block_names as build

    stored["blocks"][backbone] = build(backbone)
    atomic_write_json(cache, stored)
    return list(stored["blocks"][backbone])


def check_strategy(params: Params, cache: Path = BLOCKS_CACHE) -> None:
    finetune = params.finetune
    for backbone in finetune.backbones:
        names = block_names(backbone, cache)  # also refuses an unknown backbone name now, not after ingest
        if finetune.strategy == "last_blocks" and finetune.last_blocks > len(names):
            raise ParamsError(
                f"finetune.last_blocks: got {finetune.last_blocks}; allowed: 1 to {len(names)}, the blocks of "
                f"{backbone} ({', '.join(names)}); or strategy: full"
            )
    for backbone in params.extract.backbones:
        block_names(backbone, cache)


def check_data(raw: Path) -> None:
    if raw.is_dir() and any(raw.iterdir()):
        return
    tracked = raw.with_name(raw.name + ".dvc")
    root = os.environ.get("DVC_ROOT")
    if tracked.exists():
        raise DataMissingError(f"{raw} is tracked by DVC ({tracked}) but not here: `dvc pull` (or `dvc checkout`)")
    if root and Path(root).resolve() != Path.cwd().resolve():
        raise DataMissingError(
            f"{raw} is missing in this experiment workspace: queued and --temp experiments get only what git and "
            f"DVC track. In the project, run `dvc add {raw}` and commit {tracked} (transferlab data get does both)"
        )
    raise DataMissingError(f"{raw} is missing or empty: get a dataset with `transferlab data get [SOURCE]` "
                           "(`make demo` does this with data.source)")


def check_tracking() -> str:
    """Reach a tracking server now (a local store needs nothing); returns the store's URI."""
    from transferlab.tracking.store import is_remote, probe, tracking_uri

    uri = tracking_uri()
    if is_remote(uri):
        probe(uri)
    return uri


def run(params_file: Path, raw: Path, out: Path, cache: Path = BLOCKS_CACHE) -> Params:
    params = load(params_file)
    check_tracking()  # first of the slower checks: at most seconds, where building block layouts needs torch
    check_data(raw)
    check_strategy(params, cache)
    atomic_write_text(out, OK_TEXT)
    return params
