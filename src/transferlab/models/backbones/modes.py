"""Train/eval modes: frozen layers keep running as at inference while the rest trains."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

if TYPE_CHECKING:
    from transferlab.models.backbones.backbone import Backbone


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
    # Backbone is not an nn.Module; tested this way round so modes.py needs no import of backbone.py.
    module = target if isinstance(target, nn.Module) else target.module
    module.train(train)
    if train:
        for sub in [m for m in module.modules() if _runs_as_inference(m)]:
            sub.eval()
