"""Classifier heads trained on cached backbone features, one registered spec per kind.

* :mod:`~transferlab.models.heads.registry` -- the head registry (how to add a head), ``make_head``.
* :mod:`~transferlab.models.heads.torch_heads` -- :class:`LinearHead` and :class:`GapHead` (torch, on maps).
* :mod:`~transferlab.models.heads.svm` -- :class:`SvmHead` (scaler + LinearSVC, on pooled vectors).
* :mod:`~transferlab.models.heads.persistence` -- pickle-free save/load (:func:`load_head`).

The names below are imported on first access, so importing the registry (as
``config`` does to validate params.yaml) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GapHead": "torch_heads",
    "LinearHead": "torch_heads",
    "linear_from_gap": "torch_heads",
    "GapNet": "nets",
    "LinearNet": "nets",
    "TrainConfig": "nets",
    "predict_logits": "nets",
    "train_module": "nets",
    "SvmHead": "svm",
    "linear_from_svm": "svm",
    "load_head": "persistence",
    "HeadSpec": "registry",
    "make_head": "registry",
    "names": "registry",
    "register_head": "registry",
    "spec": "registry",
    "specs": "registry",
    "unregister_head": "registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
