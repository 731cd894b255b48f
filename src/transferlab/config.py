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

    def validate(self, section: str) -> None:
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


SECTIONS: dict[str, type] = {
    "data": DataParams,
    "ingest": IngestParams,
    "split": SplitParams,
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
