"""How params.yaml is read and how a validation problem becomes one line.

Kept apart from the section models in :mod:`transferlab.config`: the YAML reader
(numbers read as DVC reads them), the ``Section`` base model, and the
translation of pydantic's errors into "<key>: got <value>; allowed: <what>" and
"unknown key '<key>'; did you mean ...?" lines.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from transferlab.errors import UserError

M = TypeVar("M", bound=BaseModel)

CLOSE_MATCHES = 3
CLOSE_CUTOFF = 0.75  # difflib ratio: catches one or two wrong letters, not unrelated words


class ParamsError(UserError, ValueError):
    """params.yaml has an unknown section or key, or a value outside what is allowed."""


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` and ``1E5`` as floats, as YAML 1.2 (and DVC) do."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.inf|\.Inf|\.INF|\.nan|\.NaN|\.NAN)$""", re.X),
    list("-+0123456789."),
)


def read_yaml(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return yaml.load(fh, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


class Section(BaseModel):
    """A params.yaml section: unknown keys refused, no silent type coercion, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _problem(key: str, got: Any, allowed: str) -> ValueError:
    # raised inside validators; _message prefixes the section's location
    return ValueError(f"{key}: got {got!r}; allowed: {allowed}")


# ------------------------------------------------------------------------------------ messages


def _model_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class found by following field names ``loc`` from ``cls``."""
    for part in loc:
        field = cls.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        cls = field.annotation
    return cls


_ALLOWED = {
    "int_type": "an integer", "int_from_float": "an integer", "float_type": "a number", "bool_type": "true or false",
    "string_type": "a string", "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
    "model_attributes_type": "a mapping", "missing": "a value (the key is required)",
}


def _allowed(err: Mapping[str, Any], field_type: Any) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    options = typing.get_args(field_type) or (field_type,)  # int | None: (int, NoneType)
    nullable = "null or " if type(None) in options else ""
    if kind in bounds:
        (limit,) = ctx.values()
        return f"{nullable}{'an integer' if int in options else 'a number'} {bounds[kind]} {limit}"
    if nullable and kind in _ALLOWED:
        return nullable + _ALLOWED[kind]
    if kind == "literal_error":
        return f"one of {ctx['expected']}"
    if kind in ("too_short", "too_long"):
        return f"{ctx.get('min_length', 1)} or more items" if kind == "too_short" else f"at most {ctx['max_length']} items"
    if kind == "string_pattern_mismatch":
        return "a non-empty string"
    return _ALLOWED.get(kind, err["msg"])


def _message(err: Mapping[str, Any], root: type[BaseModel], prefix: tuple[str, ...]) -> str:
    loc = tuple(str(p) for p in err["loc"])
    where = ".".join((*prefix, *loc))
    if err["type"] == "extra_forbidden":
        parent = _model_at(root, loc[:-1])
        allowed = list(parent.model_fields) if parent is not None else []
        what = "section" if not (*prefix, *loc[:-1]) else "key"
        close = difflib.get_close_matches(loc[-1], allowed, n=CLOSE_MATCHES, cutoff=CLOSE_CUTOFF)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        return f"unknown {what} {where!r}; {hint}allowed: {', '.join(allowed)}"
    if err["type"] == "value_error":
        detail = str(err["ctx"]["error"])  # a ParamsError already names its full key
        return f"{where}.{detail}" if where and not isinstance(err["ctx"]["error"], ParamsError) else detail
    parent = _model_at(root, loc[:-1])
    field = parent.model_fields.get(loc[-1]) if parent is not None and loc else None
    return f"{where}: got {err.get('input')!r}; allowed: {_allowed(err, field and field.annotation)}"


def parse(cls: type[M], raw: Any, prefix: str = "") -> M:
    """Validate ``raw`` as ``cls``; raise ParamsError with one readable line per problem."""
    raw = {} if raw is None else raw
    prefix_parts = tuple(p for p in prefix.split(".") if p)
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{prefix or 'params.yaml'}: got {raw!r}; allowed: a mapping")
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        raise ParamsError("; ".join(_message(e, cls, prefix_parts) for e in err.errors())) from None


def parse_section(cls: type[M], raw: Any, section: str) -> M:
    return parse(cls, raw, section)
