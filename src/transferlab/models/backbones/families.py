"""Per-architecture layout: block partition, classifier location and surgery, state-dict quirks.

The only place that knows a family's module names; everything else asks a :class:`_Structure`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from timm.models.efficientnet import EfficientNet as TimmEfficientNet
from timm.models.resnet import ResNet as TimmResNet
from torch import Tensor, nn
from torchvision import models as tvm

from transferlab.models.backbones.base import BackboneError, Block, StateDict


def _stem(model: nn.Module, names: Iterable[str]) -> nn.Sequential:
    # A view over existing modules: parameters stay owned by the model.
    return nn.Sequential(*(model.get_submodule(name) for name in names))


def _attributes(model: nn.Module, names: Iterable[str]) -> list[Block]:
    return [(name, model.get_submodule(name)) for name in names]


def _indexed(model: nn.Module, container: str) -> list[Block]:
    return [(f"{container}.{i}", layer) for i, layer in enumerate(model.get_submodule(container))]


_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


def _torchvision_resnet_blocks(model: nn.Module) -> list[Block]:
    return [("stem", _stem(model, ("conv1", "bn1", "relu", "maxpool"))), *_attributes(model, _RESNET_STAGES)]


def _timm_resnet_blocks(model: nn.Module) -> list[Block]:
    return [("stem", _stem(model, ("conv1", "bn1", "act1", "maxpool"))), *_attributes(model, _RESNET_STAGES)]


def _features_blocks(model: nn.Module) -> list[Block]:
    return _indexed(model, "features")


def _vgg_blocks(model: nn.Module) -> list[Block]:
    """VGG's ``features`` cut after each max-pool: block1..block5, as in the paper's conv groups."""
    blocks: list[Block] = []
    current: list[nn.Module] = []
    for layer in model.features:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            blocks.append((f"block{len(blocks) + 1}", nn.Sequential(*current)))
            current = []
    if current:
        blocks.append((f"block{len(blocks) + 1}", nn.Sequential(*current)))
    return blocks


_INCEPTION_STEM = (
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "maxpool1",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "maxpool2",
)
_INCEPTION_MIXED = (
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
    "Mixed_7a",
    "Mixed_7b",
    "Mixed_7c",
)


def _inception_blocks(model: nn.Module) -> list[Block]:
    return [("stem", _stem(model, _INCEPTION_STEM)), *_attributes(model, _INCEPTION_MIXED)]


def _inception_input(model: nn.Module, x: Tensor) -> Tensor:
    # Google's weights expect inputs normalised to [-1, 1]; torchvision keeps the
    # ImageNet mean/std preset and converts inside forward() when
    # transform_input is set. Reuse that conversion so no constants live here.
    return model._transform_input(x)


def _densenet_blocks(model: nn.Module) -> list[Block]:
    """stem, then denseblockK with the transition (or final norm5) that follows it."""
    features = model.features
    stem_names = ("conv0", "norm0", "relu0", "pool0")
    groups: list[tuple[str, list[nn.Module]]] = []
    for name, layer in features.named_children():
        if name.startswith("denseblock"):
            groups.append((name, [layer]))
        elif name not in stem_names:
            groups[-1][1].append(layer)
    # DenseNet.forward applies a ReLU after `features`; it belongs to the last block.
    groups[-1][1].append(nn.ReLU())
    return [("stem", _stem(features, stem_names)), *((name, nn.Sequential(*layers)) for name, layers in groups)]


def _timm_efficientnet_blocks(model: nn.Module) -> list[Block]:
    return [
        ("stem", _stem(model, ("conv_stem", "bn1"))),
        *_indexed(model, "blocks"),
        ("conv_head", _stem(model, ("conv_head", "bn2"))),
    ]


def _timm_forward_features(model: nn.Module, x: Tensor) -> Tensor:
    return model.forward_features(x)


def _last_conv_channels(model: nn.Module) -> int:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def _vgg_global_pool(model: nn.Module) -> None:
    # VGG's ImageNet head reads a 7x7 pooled grid (25088 inputs); the new head
    # reads the globally pooled 512 channels that Backbone.pool returns.
    model.avgpool = nn.AdaptiveAvgPool2d(output_size=1)


_LEGACY_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _densenet_legacy_keys(state: StateDict) -> StateDict:
    # torchvision's DenseNet checkpoints predate the ban on '.' in module names
    # ('norm.1' -> 'norm1'); torchvision renames them the same way on load.
    return {_LEGACY_DENSENET_KEY.sub(r"\1\2", key): value for key, value in state.items()}


def _without_aux_classifier(state: StateDict) -> StateDict:
    # The auxiliary classifier only regularises ImageNet training; we build
    # Inception without it, so its tensors are dropped deliberately.
    return {key: value for key, value in state.items() if not key.startswith("AuxLogits.")}


@dataclass(frozen=True)
class _Structure:
    """Layout of one architecture family."""

    family: str
    model_type: type[nn.Module]
    classifier: str  # dotted path of the ImageNet classifier module
    blocks: Callable[[nn.Module], list[Block]]
    forward_features: Callable[[nn.Module, Tensor], Tensor] | None = None  # None: run blocks in order
    prepare_input: Callable[[nn.Module, Tensor], Tensor] | None = None
    num_features: Callable[[nn.Module], int] | None = None  # None: the classifier's input width
    build_kwargs: tuple[tuple[str, Any], ...] = ()
    init_flag: str | None = None  # builder kwarg that skips random init when weights follow
    adapt_state_dict: Callable[[StateDict], StateDict] | None = None
    after_replace: Callable[[nn.Module], None] | None = None


_TORCHVISION_STRUCTURES = (
    _Structure("torchvision ResNet", tvm.ResNet, "fc", _torchvision_resnet_blocks),
    _Structure(
        "torchvision VGG",
        tvm.VGG,
        "classifier",
        _vgg_blocks,
        num_features=_last_conv_channels,
        init_flag="init_weights",
        after_replace=_vgg_global_pool,
    ),
    _Structure("torchvision MobileNetV2", tvm.MobileNetV2, "classifier", _features_blocks),
    _Structure("torchvision MobileNetV3", tvm.MobileNetV3, "classifier", _features_blocks),
    _Structure("torchvision EfficientNet", tvm.EfficientNet, "classifier", _features_blocks),
    _Structure(
        "torchvision Inception3",
        tvm.Inception3,
        "fc",
        _inception_blocks,
        prepare_input=_inception_input,
        # As torchvision's inception_v3 builder sets them for pretrained weights,
        # minus the auxiliary head (feature extraction and fine-tuning don't need it).
        build_kwargs=(("transform_input", True), ("aux_logits", False)),
        init_flag="init_weights",
        adapt_state_dict=_without_aux_classifier,
    ),
    _Structure(
        "torchvision DenseNet",
        tvm.DenseNet,
        "classifier",
        _densenet_blocks,
        adapt_state_dict=_densenet_legacy_keys,
    ),
)

_TIMM_STRUCTURES = MappingProxyType(
    {  # timm module name -> structure of the models it defines
        "efficientnet": _Structure(
            "timm EfficientNet",
            TimmEfficientNet,
            "classifier",
            _timm_efficientnet_blocks,
            forward_features=_timm_forward_features,
        ),
        "resnet": _Structure(
            "timm ResNet", TimmResNet, "fc", _timm_resnet_blocks, forward_features=_timm_forward_features
        ),
    }
)


def _supported_families() -> str:
    families = [s.family for s in _TORCHVISION_STRUCTURES] + [s.family for s in _TIMM_STRUCTURES.values()]
    return ", ".join(families)


def _structure_for_type(model_type: type, structures: Iterable[_Structure], name: str) -> _Structure:
    for structure in structures:
        if issubclass(model_type, structure.model_type):
            return structure
    raise BackboneError(
        f"'{name}' builds a {model_type.__module__}.{model_type.__name__}, which this adapter does not know "
        f"how to split; supported families: {_supported_families()}"
    )


def _first_linear(module: nn.Module) -> nn.Linear:
    return next(m for m in module.modules() if isinstance(m, nn.Linear))


def _sequential_features(structure: _Structure, model: nn.Module, x: Tensor) -> Tensor:
    if structure.prepare_input is not None:
        x = structure.prepare_input(model, x)
    for _, block in structure.blocks(model):
        x = block(x)
    return x


def _check_partition(structure: _Structure, model: nn.Module) -> None:
    """Every parameter must sit in exactly one block or in the classifier.

    Guards against a library release that adds or renames layers: freezing and
    fine-tuning would silently skip whatever the block split misses.
    """
    owner: dict[int, str] = {}
    parts = [*structure.blocks(model), (structure.classifier, model.get_submodule(structure.classifier))]
    for part_name, part in parts:
        for param in part.parameters():
            if id(param) in owner:
                raise BackboneError(f"{structure.family}: a parameter is in both {owner[id(param)]} and {part_name}")
            owner[id(param)] = part_name
    orphans = [name for name, param in model.named_parameters() if id(param) not in owner]
    if orphans:
        raise BackboneError(f"{structure.family}: parameters outside every block and the classifier: {orphans[:5]}")
