"""Typed, validated views of the sections of ``params.yaml``.

Every stage parses its section before it does any work, so a typo or an
out-of-range value fails fast with the key and the allowed values named.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar

import yaml

T = TypeVar("T")


class ParamsError(ValueError):
    """A params.yaml section has an unknown key or a value outside what is allowed."""


def _allowed(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_allowed(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        return f"a list of {_allowed(inner)}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        keys = ", ".join(f.name for f in dataclasses.fields(tp))
        return f"a mapping with keys {keys}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ParamsError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ParamsError:
                continue
    elif tp is type(None):
        if value is None:
            return None
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            (inner, *_) = typing.get_args(tp) or (Any,)
            items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
    elif origin is dict:
        if isinstance(value, Mapping):
            _, vt = typing.get_args(tp) or (Any, Any)
            return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, Mapping):
            return parse_section(tp, value, key)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ParamsError(f"{key}: got {value!r}; allowed: {_allowed(tp)}")


def parse_section(cls: type[T], raw: Mapping[str, Any] | None, section: str) -> T:
    """Build dataclass ``cls`` from ``raw``, refusing unknown keys and bad values."""
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{section}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ParamsError(
            f"{section}: unknown key(s) {', '.join(map(str, unknown))}; allowed keys: {', '.join(names)}"
        )
    values = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in raw.items()}
    obj = cls(**values)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(section)
    return obj


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ParamsError(f"{key}: {message}")


@dataclass(frozen=True)
class IngestParams:
    max_side: int = 512
    min_per_class: int = 5
    max_pixels: int = 64_000_000
    max_file_mb: float = 200.0
    # accepted file extensions (case-insensitive); None accepts every format Pillow reads
    extensions: list[str] | None = None

    def validate(self, section: str) -> None:
        _require(
            all(e.startswith(".") for e in self.extensions or []),
            f"{section}.extensions",
            f"got {self.extensions}; allowed: null or a list like ['.jpg', '.png']",
        )
        _require(self.max_side >= 32, f"{section}.max_side", f"got {self.max_side}; allowed: an int >= 32")
        _require(
            self.min_per_class >= 1,
            f"{section}.min_per_class",
            f"got {self.min_per_class}; allowed: an int >= 1",
        )
        _require(self.max_pixels > 0, f"{section}.max_pixels", "allowed: an int > 0")
        _require(self.max_file_mb > 0, f"{section}.max_file_mb", "allowed: a number > 0")


PARTS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitParams:
    ratios: dict[str, float] = field(default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15})
    seed: int = 42
    respect_folders: bool = True
    # dataset folder -> part; e.g. {val: test} holds a dataset's val folder out for testing
    folders: dict[str, str] = field(default_factory=dict)

    def validate(self, section: str) -> None:
        for folder, part in self.folders.items():
            _require(
                folder in PARTS and part in PARTS,
                f"{section}.folders.{folder}",
                f"got {folder!r}: {part!r}; allowed: keys and values among {', '.join(PARTS)}",
            )
        key = f"{section}.ratios"
        _require(
            set(self.ratios) == set(PARTS),
            key,
            f"got keys {sorted(self.ratios)}; allowed: exactly {', '.join(PARTS)}",
        )
        _require(
            all(0 <= v < 1 for v in self.ratios.values()) and self.ratios["train"] > 0,
            key,
            "allowed: each ratio in [0, 1), train > 0",
        )
        total = sum(self.ratios.values())
        _require(abs(total - 1.0) < 1e-6, key, f"ratios sum to {total}; allowed: a sum of 1")


@dataclass(frozen=True)
class DataParams:
    """Where ``make demo`` gets ``data/raw`` from when it is absent."""

    source: str = "builtin:lfw-faces"
    sha256: str | None = None


@dataclass(frozen=True)
class ExtractParams:
    """Which frozen backbones to run, and how."""

    backbones: list[str] = field(default_factory=lambda: ["efficientnet_lite0"])
    # per-backbone weights enum name, e.g. {resnet18: ResNet18_Weights.IMAGENET1K_V1}
    weights: dict[str, str] = field(default_factory=dict)
    # per-backbone local state dict, for machines without internet
    weights_path: dict[str, str] = field(default_factory=dict)
    batch_size: int = 32
    keep_maps: bool = True

    def validate(self, section: str) -> None:
        _require(bool(self.backbones), f"{section}.backbones", "allowed: a non-empty list of backbone names")
        _require(
            len(set(self.backbones)) == len(self.backbones), f"{section}.backbones", "names must be unique"
        )
        for key in ("weights", "weights_path"):
            extra = sorted(set(getattr(self, key)) - set(self.backbones))
            _require(not extra, f"{section}.{key}", f"names {extra} are not in {section}.backbones")
        _require(self.batch_size >= 1, f"{section}.batch_size", "allowed: an int >= 1")


ClassWeight = Literal[None, "balanced"]


@dataclass(frozen=True)
class TorchHeadParams:
    """What every torch head trained on cached maps shares."""

    dropout: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 1e-2
    max_epochs: int = 100
    batch_size: int = 64
    patience: int = 10
    class_weight: ClassWeight = None
    random_state: int = 0

    def validate(self, section: str) -> None:
        _require(0 <= self.dropout < 1, f"{section}.dropout", f"got {self.dropout}; allowed: 0 <= dropout < 1")
        _require(0 < self.lr <= 1, f"{section}.lr", f"got {self.lr}; allowed: 0 < lr <= 1")
        _require(self.weight_decay >= 0, f"{section}.weight_decay", f"got {self.weight_decay}; allowed: a number >= 0")
        for name in ("max_epochs", "batch_size", "patience"):
            value = getattr(self, name)
            _require(value >= 1, f"{section}.{name}", f"got {value}; allowed: an int >= 1")


@dataclass(frozen=True)
class LinearHeadParams(TorchHeadParams):
    """Flatten -> Dense(hidden, ReLU) -> Dropout -> Dense; hidden 0 = one linear layer."""

    dropout: float = 0.5
    lr: float = 3e-5  # thousands of flattened inputs: a small step, or it overfits in one epoch
    max_epochs: int = 50
    hidden: int = 256

    def validate(self, section: str) -> None:
        _require(self.hidden >= 0, f"{section}.hidden", "allowed: an int >= 0 (0 = a single linear layer)")
        super().validate(section)


@dataclass(frozen=True)
class GapHeadParams(TorchHeadParams):
    """Global average pooling -> Dropout -> Dense."""


@dataclass(frozen=True)
class SvmHeadParams:
    """Standardized pooled vectors -> LinearSVC; C_grid chooses C by CV on train."""

    C: float = 1.0
    C_grid: list[float] | None = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    cv: int = 5
    class_weight: ClassWeight = None
    max_iter: int = 5000
    calibrate: bool = True
    random_state: int = 0

    def validate(self, section: str) -> None:
        _require(self.C > 0, f"{section}.C", f"got {self.C}; allowed: a number > 0")
        _require(all(c > 0 for c in self.C_grid or []), f"{section}.C_grid", "allowed: numbers > 0")
        _require(self.cv >= 2, f"{section}.cv", "allowed: an int >= 2")
        _require(self.max_iter >= 1, f"{section}.max_iter", "allowed: an int >= 1")


HEADS = ("linear", "gap", "svm")


@dataclass(frozen=True)
class TrainHeadParams:
    linear: LinearHeadParams = field(default_factory=LinearHeadParams)
    gap: GapHeadParams = field(default_factory=GapHeadParams)
    svm: SvmHeadParams = field(default_factory=SvmHeadParams)

    def head(self, kind: str) -> Any:
        _require(kind in HEADS, "train_head", f"unknown head {kind!r}; allowed: {', '.join(HEADS)}")
        return getattr(self, kind)


@dataclass(frozen=True)
class AugmentParams:
    """Training-time augmentation for fine-tuning (eval uses the deterministic transform)."""

    random_resized_crop: bool = True
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    hflip: bool = True

    def validate(self, section: str) -> None:
        lo, hi = (self.scale + [0.0, 0.0])[:2]
        _require(
            len(self.scale) == 2 and 0 < lo <= hi <= 1,
            f"{section}.scale",
            f"got {self.scale}; allowed: [min, max] with 0 < min <= max <= 1",
        )


@dataclass(frozen=True)
class FinetuneParams:
    """Fine-tune a pretrained backbone with a new (or warm-started) head."""

    backbones: list[str] = field(default_factory=lambda: ["efficientnet_lite0"])
    strategy: Literal["head_only", "last_blocks", "full"] = "last_blocks"
    last_blocks: int = 2  # used by strategy last_blocks: the top N named blocks train
    init: Literal["new", "best_head"] = "new"
    dropout: float = 0.2
    lr: float = 1e-3  # the head's learning rate
    backbone_lr_factor: float = 0.1  # backbone lr = lr * factor: small, to keep what it knows
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    max_epochs: int = 10
    patience: int = 3
    monitor: Literal["val_loss", "val_accuracy"] = "val_loss"
    batch_size: int = 32
    class_weight: ClassWeight = None
    augment: AugmentParams = field(default_factory=AugmentParams)
    seed: int = 0

    def validate(self, section: str) -> None:
        _require(bool(self.backbones), f"{section}.backbones", "allowed: a non-empty list of backbone names")
        _require(self.last_blocks >= 1, f"{section}.last_blocks", "allowed: an int >= 1")
        _require(0 <= self.dropout < 1, f"{section}.dropout", "allowed: 0 <= dropout < 1")
        _require(0 < self.lr <= 1, f"{section}.lr", f"got {self.lr}; allowed: 0 < lr <= 1")
        _require(
            0 < self.backbone_lr_factor <= 1,
            f"{section}.backbone_lr_factor",
            f"got {self.backbone_lr_factor}; allowed: 0 < factor <= 1 (fine-tuning needs a small backbone lr)",
        )
        _require(0 <= self.momentum < 1, f"{section}.momentum", "allowed: 0 <= momentum < 1")
        _require(self.weight_decay >= 0, f"{section}.weight_decay", "allowed: a number >= 0")
        _require(
            0 <= self.warmup_epochs < self.max_epochs,
            f"{section}.warmup_epochs",
            f"got {self.warmup_epochs}; allowed: 0 <= warmup_epochs < max_epochs ({self.max_epochs})",
        )
        for name in ("max_epochs", "patience", "batch_size"):
            value = getattr(self, name)
            _require(value >= 1, f"{section}.{name}", f"got {value}; allowed: an int >= 1")


@dataclass(frozen=True)
class EvaluateParams:
    """Test-split evaluation; the champion is chosen on validation figures only."""

    n_boot: int = 2000  # bootstrap resamples for the accuracy interval
    ci: float = 0.95
    seed: int = 0
    ece_bins: int = 15
    select_by: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    registered_model: str = "transferlab"

    def validate(self, section: str) -> None:
        _require(self.n_boot >= 100, f"{section}.n_boot", "allowed: an int >= 100")
        _require(0 < self.ci < 1, f"{section}.ci", f"got {self.ci}; allowed: 0 < ci < 1")
        _require(self.ece_bins >= 2, f"{section}.ece_bins", "allowed: an int >= 2")
        _require(bool(self.registered_model.strip()), f"{section}.registered_model", "allowed: a non-empty name")


SECTIONS: dict[str, type] = {
    "data": DataParams,
    "ingest": IngestParams,
    "split": SplitParams,
    "extract": ExtractParams,
    "train_head": TrainHeadParams,
    "finetune": FinetuneParams,
    "evaluate": EvaluateParams,
}


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return raw


def section(name: str, path: str | Path = "params.yaml") -> Any:
    """Parse one named section of ``params.yaml`` into its dataclass."""
    if name not in SECTIONS:
        raise ParamsError(f"unknown section {name!r}; allowed: {', '.join(SECTIONS)}")
    return parse_section(SECTIONS[name], load_params(path).get(name), name)


def as_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params)
