"""Constants, type aliases and error classes shared by every module of the backbone adapter.

Kept apart from the registry so that the lower modules can raise these errors without import cycles.
"""

from __future__ import annotations

from torch import Tensor, nn

from transferlab.errors import UserError

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
