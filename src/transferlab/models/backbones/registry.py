"""Backbone names -> built :class:`Backbone`: EfficientNet-Lite, torchvision and ``timm-`` models."""

from __future__ import annotations

import inspect
from pathlib import Path

import timm
import timm.models
import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models import WeightsEnum

from transferlab.models.backbones.backbone import Backbone
from transferlab.models.backbones.base import NO_WEIGHTS, TIMM_PREFIX, BackboneError
from transferlab.models.backbones.families import (
    _TIMM_STRUCTURES,
    _TORCHVISION_STRUCTURES,
    _Structure,
    _structure_for_type,
    _supported_families,
)
from transferlab.models.backbones.lite import (
    _LITE_VARIANTS,
    _LUKEMELAS_MARKER,
    _packaged_lite_file,
    translate_lukemelas_state_dict,
)
from transferlab.models.backbones.transforms import _timm_transform_config, _torchvision_transform_config, _weights_name
from transferlab.models.backbones.weights import (
    _create_pretrained_timm,
    _download_torchvision_state,
    _load_exactly,
    _read_state_dict,
    _torchvision_cache_file,
)

# --------------------------------------------------------------------------
# EfficientNet-Lite
# --------------------------------------------------------------------------


def _load_lite(name: str, weights: str | None, weights_path: Path | None) -> Backbone:
    variant = _LITE_VARIANTS[name]
    if weights not in (None, NO_WEIGHTS):
        raise BackboneError(f"{name} has one weight set (the packaged ImageNet weights): use weights=None or 'none'")
    model = timm.create_model(variant.timm_arch, pretrained=False)
    structure = _structure_for_type(type(model), _TIMM_STRUCTURES.values(), name)
    if weights == NO_WEIGHTS:
        weights_id = NO_WEIGHTS
    else:
        path = weights_path if weights_path is not None else _packaged_lite_file(variant)
        state = _read_state_dict(path)
        if _LUKEMELAS_MARKER in state:
            state = translate_lukemelas_state_dict(state, model)
        _load_exactly(model, state, str(path))
        weights_id = f"{name}:{path.name}"
    return Backbone(name, weights_id, model, structure, _timm_transform_config(model))


# --------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------


def _torchvision_structure(name: str) -> _Structure:
    try:
        builder = tvm.get_model_builder(name)
    except ValueError as err:
        raise BackboneError(
            f"unknown backbone {name!r}: expected one of {sorted(_LITE_VARIANTS)}, a torchvision "
            f"classification model (torchvision.models.list_models()), or '{TIMM_PREFIX}<timm model name>'"
        ) from err
    # The builder's return annotation names the class, so the family is known
    # before paying for a random initialisation the weights would overwrite.
    model_type = inspect.signature(builder).return_annotation
    if not isinstance(model_type, type):
        raise BackboneError(f"cannot tell the architecture family of torchvision model {name!r}")
    return _structure_for_type(model_type, _TORCHVISION_STRUCTURES, name)


def _torchvision_weights(name: str, weights: str | None) -> WeightsEnum:
    """The named weight set; for None or 'none' the model's DEFAULT (its preprocessing is still needed)."""
    enum_type = tvm.get_model_weights(name)
    if weights is None or weights == NO_WEIGHTS:
        return enum_type.DEFAULT
    try:
        chosen = tvm.get_weight(weights) if "." in weights else enum_type[weights]
    except (KeyError, ValueError) as err:
        raise BackboneError(f"{name}: unknown weights {weights!r}; choose from {_weight_choices(enum_type)}") from err
    if not isinstance(chosen, enum_type):
        raise BackboneError(f"{name}: {weights!r} are not {name} weights; choose from {_weight_choices(enum_type)}")
    return chosen


def _weight_choices(enum_type: type[WeightsEnum]) -> list[str]:
    return [_weights_name(member) for member in enum_type]


def _load_torchvision(name: str, weights: str | None, weights_path: Path | None) -> Backbone:
    structure = _torchvision_structure(name)
    named = _torchvision_weights(name, weights)
    pretrained = weights != NO_WEIGHTS
    kwargs = dict(structure.build_kwargs, num_classes=len(named.meta["categories"]))
    if structure.init_flag is not None:
        kwargs[structure.init_flag] = not pretrained
    model = tvm.get_model(name, weights=None, **kwargs)
    if not pretrained:
        weights_id = NO_WEIGHTS
    else:
        state = _read_state_dict(weights_path) if weights_path else _download_torchvision_state(name, named)
        if structure.adapt_state_dict is not None:
            state = structure.adapt_state_dict(state)
        _load_exactly(model, state, str(weights_path or _torchvision_cache_file(named)))
        weights_id = f"{name}:{weights_path.name}" if weights_path else _weights_name(named)
    return Backbone(name, weights_id, model, structure, _torchvision_transform_config(named))


# --------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------


def _timm_structure(name: str, arch: str) -> _Structure:
    if not timm.is_model(arch):
        raise BackboneError(f"unknown timm model {arch!r} (from {name!r}); see timm.list_models()")
    for module_name, structure in _TIMM_STRUCTURES.items():
        if timm.models.is_model_in_modules(arch, [module_name]):
            return structure
    raise BackboneError(f"{name!r}: unsupported timm family; supported families: {_supported_families()}")


def _load_timm(name: str, weights: str | None, weights_path: Path | None) -> Backbone:
    arch = name.removeprefix(TIMM_PREFIX)
    structure = _timm_structure(name, arch)
    if weights not in (None, NO_WEIGHTS):
        raise BackboneError(f"{name}: choose timm weights with a tag in the name (e.g. 'timm-resnet18.a1_in1k')")
    if weights is None and weights_path is None:
        model = _create_pretrained_timm(name, arch)
        cfg = model.pretrained_cfg
        weights_id = f"timm:{cfg['architecture']}.{cfg['tag']}"
    else:
        model = timm.create_model(arch, pretrained=False)
        weights_id = NO_WEIGHTS
        if weights_path is not None:
            _load_exactly(model, _read_state_dict(weights_path), str(weights_path))
            weights_id = f"{name}:{weights_path.name}"
    # The family was inferred from the timm module name; confirm the class agrees.
    _structure_for_type(type(model), [structure], name)
    return Backbone(name, weights_id, model, structure, _timm_transform_config(model))


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def load_backbone(name: str, weights: str | None = None, weights_path: str | Path | None = None) -> Backbone:
    """Build backbone ``name`` with ImageNet weights; see the module docstring for names and weights.

    ``weights``: None for the default weight set; a torchvision weights enum
    name (``"ResNet18_Weights.IMAGENET1K_V1"`` or ``"IMAGENET1K_V1"``) for
    torchvision models; ``"none"`` for random initialisation.
    ``weights_path``: a local state dict (``.pth`` loaded with
    ``weights_only=True``, or ``.safetensors``) used instead of downloading;
    preprocessing still follows ``weights`` (torchvision) or the timm config.
    """
    if weights == NO_WEIGHTS and weights_path is not None:
        raise BackboneError("weights='none' (random initialisation) contradicts a weights_path")
    path = Path(weights_path) if weights_path is not None else None
    if name in _LITE_VARIANTS:
        return _load_lite(name, weights, path)
    if name.startswith(TIMM_PREFIX):
        return _load_timm(name, weights, path)
    return _load_torchvision(name, weights, path)


def _architecture(name: str) -> tuple[nn.Module, _Structure]:
    """Backbone ``name`` built without weights (random init), and its family structure."""
    if name in _LITE_VARIANTS:
        model = timm.create_model(_LITE_VARIANTS[name].timm_arch, pretrained=False)
        return model, _structure_for_type(type(model), _TIMM_STRUCTURES.values(), name)
    if name.startswith(TIMM_PREFIX):
        arch = name.removeprefix(TIMM_PREFIX)
        structure = _timm_structure(name, arch)
        return timm.create_model(arch, pretrained=False), structure
    structure = _torchvision_structure(name)
    named = _torchvision_weights(name, None)
    kwargs = dict(structure.build_kwargs, num_classes=len(named.meta["categories"]))
    if structure.init_flag is not None:
        kwargs[structure.init_flag] = False  # on the meta device there is nothing to initialise
    return tvm.get_model(name, weights=None, **kwargs), structure


def block_names(name: str) -> list[str]:
    """Names of backbone ``name``'s blocks, input to output, without reading or allocating any weights."""
    with torch.device("meta"):  # shapes only: even VGG16's 138M parameters cost nothing
        model, structure = _architecture(name)
    return [block for block, _ in structure.blocks(model)]
