"""A fine-tuned network on disk: ``model.safetensors`` + ``model.json``, and how to rebuild it.

The training job (:mod:`transferlab.training.finetune`) writes this format;
evaluation and serving read it through :func:`load_finetuned`, so neither
imports training code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import nn

from transferlab.io import sha256_file
from transferlab.models.backbones import NO_WEIGHTS, Backbone, load_backbone

FORMAT_VERSION = 1  # of model.json and checkpoint.pt; bumped when their layout changes
MODEL_FILE = "model.safetensors"
META_FILE = "model.json"
HEAD_TYPE = "dropout_linear"


def new_head(num_features: int, n_classes: int, dropout: float) -> nn.Sequential:
    """The fine-tuned classifier on pooled features: ``Dropout(p) -> Linear(C, K)``."""
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, n_classes))


def head_spec(num_features: int, n_classes: int, dropout: float) -> dict[str, Any]:
    return {"type": HEAD_TYPE, "in_features": num_features, "out_features": n_classes, "dropout": dropout}



def _comparable(transform: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in transform.items() if k != "source"}


def load_finetuned(directory: str | Path) -> tuple[nn.Module, dict[str, Any], Backbone]:
    """Rebuild a fine-tuned network from ``model.safetensors`` + ``model.json`` in ``directory``.

    Returns (the network in eval mode, the model.json metadata, its Backbone
    adapter, whose ``eval_transform`` is the preprocessing to use). Nothing is
    downloaded: the architecture is built with random init, then every tensor
    is loaded strictly.
    """
    directory = Path(directory)
    meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{directory / META_FILE}: unsupported format {meta.get('format')!r}; expected {FORMAT_VERSION}"
        )
    path = directory / MODEL_FILE
    digest = sha256_file(path)
    if digest != meta.get("sha256"):
        raise ValueError(f"{path}: checksum {digest} does not match {META_FILE} ({meta.get('sha256')})")
    backbone = load_backbone(meta["backbone"], weights=NO_WEIGHTS)
    if _comparable(backbone.transform_config()) != _comparable(meta["transform"]):
        # torchvision gives a random-init model its DEFAULT weights' preprocessing, which differs
        # from e.g. IMAGENET1K_V1's for some models; predicting with the wrong one is silently worse.
        raise ValueError(
            f"{directory}: {meta['backbone']} was fine-tuned with preprocessing {meta['transform']}, but "
            f"rebuilding it gives {backbone.transform_config()}"
        )
    head = meta["head"]
    backbone.replace_classifier(new_head(head["in_features"], head["out_features"], head["dropout"]))
    backbone.module.load_state_dict(safetensors.torch.load_file(str(path)), strict=True)
    return backbone.module.eval(), meta, backbone
