"""Backbones' block layouts shipped with the package, so that preflight needs no torch to check them.

preflight checks ``finetune.last_blocks`` against the names of a backbone's
blocks. Building the backbone for them, even on the meta device, imports torch,
torchvision and timm: seconds on 2 cores, in every fresh project's first
``dvc repro``. So ``block_layouts.json``, next to this module, holds the layout
of every backbone the adapter knows by name (the EfficientNet-Lite variants and
torchvision's classification models of the families it supports), computed from
the adapter's own code, never typed, under a key: the torch, torchvision and timm
versions and a digest of the adapter package's code. Another key (other versions,
an edited adapter) means the table is not read: the layout is built instead.

Regenerate it after changing the adapter (src/transferlab/models/backbones/) or the
pinned torch, torchvision or timm; a test fails while it is stale:

    python -m transferlab.block_layouts --write

It lives outside the adapter package on purpose: dvc.yaml lists that package as
code of extract, finetune and evaluate, and regenerating this file must not make
them stale. Nothing here imports torch unless a layout has to be built.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
from importlib.metadata import version
from pathlib import Path

from transferlab.io import atomic_write_json, sha256_file

SHIPPED = Path(__file__).with_name("block_layouts.json")
REGENERATE = "python -m transferlab.block_layouts --write"
# block layouts depend on these libraries' versions and on our adapter package's code
LAYOUT_DISTRIBUTIONS = ("torch", "torchvision", "timm")
ADAPTER_MODULE = "transferlab.models.backbones"


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


def layout_key() -> str:
    """What block layouts depend on: the libraries' versions and the adapter's code."""
    code = _adapter_digest()
    return ",".join([*(f"{d}=={version(d)}" for d in LAYOUT_DISTRIBUTIONS), f"adapter={code[:16]}"])


def shipped(key: str, path: Path | None = None) -> dict[str, list[str]]:
    """The shipped layouts, by backbone name, if they were computed under ``key``; else none."""
    path = SHIPPED if path is None else path
    table = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return table.get("blocks", {}) if table.get("versions") == key else {}


def build() -> dict[str, object]:
    """The table as the adapter builds it now: seconds (imports torch, builds each model on the meta device).

    Every backbone the adapter knows by name: the EfficientNet-Lite variants, then
    torchvision's classification models of the families it splits. ``timm-`` names
    are left out (any timm model of a supported family, with any pretrained tag, is
    one): those are built once and kept in the project's cache.
    """
    from torchvision import models as tvm

    from transferlab.models.backbones import BackboneError, block_names
    # The adapter has no public list of its names; reading its table here keeps the adapter's code,
    # and so every stage that depends on it, unchanged.
    from transferlab.models.backbones.lite import _LITE_VARIANTS

    blocks = {name: block_names(name) for name in _LITE_VARIANTS}
    for name in sorted(tvm.list_models(module=tvm)):  # classification models only
        try:
            blocks[name] = block_names(name)
        except BackboneError:  # a family the adapter does not split (ViT, Swin, RegNet, ...)
            continue
    return {"versions": layout_key(), "blocks": blocks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {SHIPPED.name} (default: only check it)")
    args = parser.parse_args(argv)
    table = build()
    if args.write:
        atomic_write_json(SHIPPED, table)
        print(f"{SHIPPED}: {len(table['blocks'])} backbones under {table['versions']}")
        return 0
    current = json.loads(SHIPPED.read_text(encoding="utf-8")) if SHIPPED.is_file() else None
    if current != table:
        print(f"{SHIPPED} is stale: run `{REGENERATE}`", file=sys.stderr)
        return 1
    print(f"{SHIPPED} is current ({len(table['blocks'])} backbones)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
