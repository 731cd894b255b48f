"""The :class:`Backbone` adapter: a pretrained network plus its layout, as the pipeline sees it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.transforms import v2

from transferlab.models.backbones.base import ALL_BLOCKS, Block
from transferlab.models.backbones.families import _check_partition, _first_linear, _sequential_features, _Structure
from transferlab.models.backbones.modes import evaluating, set_train_mode
from transferlab.models.backbones.transforms import TransformConfig, _eval_transform, _train_transform


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

    def block_outputs(self, x: Tensor) -> Iterator[tuple[str, Tensor]]:
        """Each named block's output, input to output (mode and grad are the caller's).

        The blocks run in order, so the last output is ``forward_features``' maps (a test checks it).
        """
        if self._structure.prepare_input is not None:
            x = self._structure.prepare_input(self.module, x)
        for name, block in self.blocks():
            x = block(x)
            yield name, x

    def imagenet_logits_from_maps(self, maps: Tensor) -> Tensor:
        """The ImageNet classifier on ``forward_features`` maps: ``module(x)`` without a second forward."""
        if not self._has_imagenet_head:
            raise RuntimeError(f"{self.name}: the ImageNet classifier was replaced")
        if self.classifier_name == "classifier" and self.family == "torchvision VGG":
            return self.classifier(torch.flatten(self.module.avgpool(maps), 1))  # VGG reads a 7x7 grid
        return self.classifier(self.pool(maps))

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
