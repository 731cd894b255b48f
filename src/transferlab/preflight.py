"""Checks that run before any stage does work, on every ``dvc repro`` (the ``preflight`` stage).

DVC re-runs a stage only when the params keys it lists change, so a typo in
``params.yaml`` (``finetun:``, ``train_head.lineer:``) would otherwise go
unnoticed for ever. Here the whole file is validated, sections, keys and the
rules across sections, including those that need the backbone's architecture
(``finetune.last_blocks``); the dataset must be where ingest looks; and a
tracking server must answer. Each failure is one line naming what to change.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from importlib.metadata import version
from pathlib import Path

from transferlab.config import Params, ParamsError, load
from transferlab.errors import UserError
from transferlab.io import atomic_write_json, atomic_write_text, sha256_file

BLOCKS_CACHE = Path(".dvc/tmp/transferlab-blocks.json")
# block layouts depend on these libraries' versions and on our adapter package's code
LAYOUT_DISTRIBUTIONS = ("torch", "torchvision", "timm")
ADAPTER_MODULE = "transferlab.models.backbones"
OK_TEXT = "params.yaml, the dataset and the MLflow store were checked before this pipeline ran\n"


class DataMissingError(UserError):
    """The raw dataset is not where ingest reads it."""


def _adapter_digest() -> str:
    """sha256 over every .py file of the adapter package, in sorted order: any module's edit changes it."""
    # find_spec locates the package without importing it (and so without importing torch).
    spec = importlib.util.find_spec(ADAPTER_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return "?"
    files = sorted(path for folder in spec.submodule_search_locations for path in Path(folder).glob("*.py"))
    combined = hashlib.sha256()
    for path in files:
        # The name goes in too, so moving code between modules changes the key.
        combined.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return combined.hexdigest()


def _layout_key() -> str:
    code = _adapter_digest()
    return ",".join([*(f"{d}=={version(d)}" for d in LAYOUT_DISTRIBUTIONS), f"adapter={code[:16]}"])


def block_names(backbone: str, cache: Path = BLOCKS_CACHE) -> list[str]:
    """The backbone's block names, cached per library versions (building it needs torch: seconds)."""
    stored = json.loads(cache.read_text()) if cache.is_file() else {}
    key = _layout_key()
    if stored.get("versions") != key:
        stored = {"versions": key, "blocks": {}}
    if backbone not in stored["blocks"]:
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
