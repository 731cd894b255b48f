"""Weight files: local state dicts, strict loading, hash checks, and torchvision/timm downloads.

When a download fails (offline), the error names the cache file to provide and ``weights_path``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import safetensors.torch
import timm
import timm.models
import torch
from torch import Tensor, nn
from torchvision.models import WeightsEnum

from transferlab.models.backbones.base import (
    SAFETENSORS_SUFFIX,
    StateDict,
    WeightMappingError,
    WeightsUnavailableError,
)
from transferlab.models.backbones.transforms import _weights_name


def _read_state_dict(path: Path) -> StateDict:
    if not path.is_file():
        raise WeightsUnavailableError(f"weights_path {path} does not exist or is not a file")
    if path.suffix == SAFETENSORS_SUFFIX:
        state: Any = safetensors.torch.load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightMappingError(
            f"{path} is not a state dict (parameter name -> tensor); for a training checkpoint, "
            "save its model state dict on its own"
        )
    return dict(state)


def _load_exactly(model: nn.Module, state: StateDict, source: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightMappingError(f"weights from {source} do not fit {type(model).__name__}: {err}") from err


def _verify_hash_prefix(path: Path) -> None:
    # Files named like torch hub checkpoints (name-<sha256 prefix>.pth) carry their own checksum.
    match = torch.hub.HASH_REGEX.search(path.name)
    if match is None:
        return
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(match.group(1)):
        raise WeightsUnavailableError(f"{path} is corrupted: sha256 {digest} does not start with {match.group(1)}")


def _torchvision_cache_file(weights: WeightsEnum) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def _download_torchvision_state(name: str, weights: WeightsEnum) -> StateDict:
    """torchvision's own loading path, with weights_only=True (its builders pass False).

    torch.hub checks the sha256 prefix in the file name only while
    downloading; a file already in the cache is read as is.
    """
    try:
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True, map_location="cpu")
    except OSError as err:  # URLError/HTTPError/socket errors: offline or unreachable
        raise WeightsUnavailableError(
            f"cannot load {_weights_name(weights)} for {name!r}: {_torchvision_cache_file(weights)} is not "
            f"in the torch hub cache and downloading {weights.url} failed ({err}). Put that file there "
            "(or set TORCH_HOME to a cache that has it), or set `weights_path` in params.yaml "
            "to a local copy of the state dict."
        ) from err


def _create_pretrained_timm(name: str, arch: str) -> nn.Module:
    try:
        return timm.create_model(arch, pretrained=True)
    except OSError as err:  # huggingface_hub's LocalEntryNotFoundError, connection errors
        cfg = timm.models.get_pretrained_cfg(arch)
        hub_id = getattr(cfg, "hf_hub_id", None) or arch
        raise WeightsUnavailableError(
            f"cannot load pretrained timm weights for {name!r}: {hub_id} is not in the Hugging Face cache "
            f"($HF_HOME/hub) and downloading failed ({err}). Set `weights_path` in params.yaml to a local "
            f"state dict ({SAFETENSORS_SUFFIX} or .pth) for {arch}."
        ) from err
