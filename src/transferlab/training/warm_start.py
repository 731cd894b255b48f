"""``finetune.init: best_head``: start the fine-tuned head from the best cached-feature head.

The fine-tuned head is a linear layer on pooled features. A head can start it
when its registry spec has a ``warm_start`` (a fitted head -> ``(weight,
bias)`` of such a layer): the built-in ``gap`` copies its fc, ``svm`` folds
its scaler into the LinearSVC's linear map (hinge-loss scores are not
calibrated log-odds, so the first epochs rescale them; the decision boundary
is kept). Heads without one (``linear`` reads flattened ``C x H x W`` maps,
which do not exist after pooling) are skipped with a note. Among the fitted
heads that fit (same classes, same feature count) the one with the best
*validation* accuracy wins (``models/heads/<backbone>/<head>/metrics.json``;
test figures are never read); ties go to the earlier registered head.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from transferlab.io import sha256_file
from transferlab.models.heads import registry
from transferlab.models.heads.persistence import load_head
from transferlab.models.heads.registry import HeadSpec
from transferlab.training.images import FinetuneError

__all__ = ["WarmStart", "choose_warm_start"]

HEAD_MODEL_FILE = "model.safetensors"
HEAD_METRICS_FILE = "metrics.json"
SELECTION_KEY = "val_accuracy"  # warm-start choice: a validation figure, never test

Echo = Callable[[str], None]


def _say(message: str) -> None:
    print(message, flush=True)


@dataclass(frozen=True)
class WarmStart:
    """Initial head weights taken from a cached-feature head."""

    kind: str  # the registered head's name
    path: str
    sha256: str
    val_accuracy: float
    weight: Tensor  # K x C
    bias: Tensor  # K

    def describe(self) -> dict[str, Any]:
        return {"kind": "best_head", "head": self.kind, "path": self.path, "sha256": self.sha256,
                SELECTION_KEY: self.val_accuracy}


def _candidate(heads_dir: Path, spec: HeadSpec, classes: list[str], num_features: int, note: Echo) -> WarmStart | None:
    kind = spec.name
    path = heads_dir / kind / HEAD_MODEL_FILE
    metrics = heads_dir / kind / HEAD_METRICS_FILE
    if not (path.is_file() and metrics.is_file()):
        return None
    head = load_head(path)
    if [str(c) for c in head.classes_] != classes or head.n_features_in_ != num_features:
        note(f"warm start: skipped {kind} head {path}: it was fitted for classes {list(head.classes_)} "
             f"on {head.n_features_in_} features, not {classes} on {num_features}")
        return None
    score = float(json.loads(metrics.read_text(encoding="utf-8"))[SELECTION_KEY])
    fold = spec.warm_start_fn()
    assert fold is not None  # only specs with a warm_start are candidates
    weight, bias = fold(head)
    return WarmStart(kind, str(path), sha256_file(path), score, weight, bias)


def choose_warm_start(
    heads_dir: Path, classes: list[str], num_features: int, note: Echo = _say, kinds: Sequence[str] | None = None
) -> WarmStart:
    """The fitted head with the best val accuracy among those whose spec can warm-start.

    ``kinds``: the heads that may be used (``train_head.kinds``); None: every
    registered head. Raises FinetuneError when no compatible head exists
    (train_head has not run, or no usable kind is trained).
    """
    considered = [s for s in registry.specs() if kinds is None or s.name in kinds]
    usable = [s for s in considered if s.warm_start is not None]
    for s in considered:
        if s.warm_start is None and (heads_dir / s.name).is_dir():
            note(f"warm start: skipped the {s.name} head: it gives no linear map on pooled features, where the "
                 "fine-tuned head sits")
    if not usable:
        able = [s.name for s in registry.specs() if s.warm_start is not None]
        raise FinetuneError(f"finetune.init is best_head, but none of train_head.kinds {list(kinds or [])} can "
                            f"warm-start the fine-tuned head (these can: {', '.join(able)}); add one to "
                            "train_head.kinds or set finetune.init: new")
    found = [c for s in usable if (c := _candidate(heads_dir, s, classes, num_features, note))]
    if not found:
        raise FinetuneError(
            f"finetune.init is best_head, but {heads_dir} has no fitted {' or '.join(s.name for s in usable)} head "
            "for these classes; run the train_head stages first or set finetune.init: new"
        )
    order = [s.name for s in usable]
    best = max(found, key=lambda c: (c.val_accuracy, -order.index(c.kind)))
    note(f"warm start: head initialised from the {best.kind} head ({SELECTION_KEY} {best.val_accuracy:.4f})")
    return best
