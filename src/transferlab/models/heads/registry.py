"""The head registry: one :class:`HeadSpec` per head kind, the only list of heads there is.

Everything that needs to know the heads asks here: ``config`` (which
``train_head.<name>`` sections and ``train_head.kinds`` names are valid),
the train_head job (what a head reads, how it is built), finetune (which heads
can warm-start its head) and evaluate (what a head reads).

A spec names the head, its params model (a pydantic section model: defaults,
bounds and messages for ``train_head.<name>``), what it reads from the feature
store (``"maps"``: ``N x C x H x W``; ``"pooled"``: ``N x C``), its estimator
class and, optionally, ``warm_start``: a function of a fitted head giving
``(weight K x C, bias K)`` tensors of a linear layer on pooled features (what
``finetune.init: best_head`` copies into the fine-tuned head), or None.

Adding a head takes two edits:

1. **Its module**, e.g. ``src/transferlab/models/heads/centroid.py``::

       from pydantic import Field
       from sklearn.base import BaseEstimator, ClassifierMixin
       from transferlab.config import Section
       from transferlab.models.heads.registry import register_head

       class CentroidParams(Section):
           shrink: float = Field(0.0, ge=0)

       @register_head("centroid", params=CentroidParams, reads="pooled")
       class CentroidHead(ClassifierMixin, BaseEstimator):
           def __init__(self, shrink: float = CentroidParams().shrink): ...
           def fit(self, X, y): ...      # fit(X, y, eval_set=(X_val, y_val)) if it early-stops
           def predict(self, X): ...     # predict_proba too, for losses and calibration figures
           def save(self, path): ...     # see persistence.save_arrays / load_arrays
           def _restore(self, meta, path): ...

   The estimator follows the scikit-learn API; its ``__init__`` takes the
   params model's fields as keywords, with the params model's defaults. It may
   set ``n_params_`` (trainable parameter count) and ``history_`` (per-epoch
   dicts) for metrics.json and curve.csv. A head is registered when its module
   is imported; the registry imports every module of this package on its first
   lookup, so a module placed here needs no other import (one elsewhere must be
   imported before params.yaml is validated: tests do that).
2. **Its params section** in ``params.yaml``: ``train_head.<name>: {...}`` (the
   train_head stage lists it as its params) and the name in
   ``train_head.kinds``, which drives the train_head stage matrix and what
   evaluate scores.

This module imports no torch: validating params.yaml (the preflight stage)
stays fast. The built-in heads are declared by name (``"module:attribute"``)
and imported on first use.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

from transferlab.config import (
    CLOSE_CUTOFF, CLOSE_MATCHES, GapHeadParams, LinearHeadParams, ParamsError, SvmHeadParams, parse,
)

__all__ = [
    "HeadSpec",
    "READS",
    "construct",
    "make_head",
    "names",
    "parse_sections",
    "register_head",
    "spec",
    "specs",
    "unregister_head",
]

READS = ("maps", "pooled")
KINDS_KEY = "kinds"  # train_head.kinds: the one key of the section that is not a head
NAME = re.compile(r"[a-z][a-z0-9_]*")
SUPPORT_MODULES = frozenset({"common", "nets", "persistence", "registry"})  # in this package, but not heads
T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class HeadSpec:
    """One head kind. ``estimator`` and ``warm_start`` are objects or ``"module:attribute"`` names."""

    name: str
    params: type[BaseModel]
    reads: str  # "maps" or "pooled"
    estimator: type | str
    warm_start: Callable[[Any], tuple[Any, Any]] | str | None = None

    def estimator_class(self) -> type:
        return _resolve(self.estimator)

    def warm_start_fn(self) -> Callable[[Any], tuple[Any, Any]] | None:
        return None if self.warm_start is None else _resolve(self.warm_start)

    @property
    def reads_maps(self) -> bool:
        return self.reads == "maps"


_SPECS: dict[str, HeadSpec] = {}
_discovered = False


def _resolve(ref: Any) -> Any:
    if not isinstance(ref, str):
        return ref
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _ref(obj: Any) -> str:
    return obj if isinstance(obj, str) else f"{obj.__module__}:{obj.__qualname__}"


def _add(head: HeadSpec) -> None:
    if not NAME.fullmatch(head.name) or head.name == KINDS_KEY:
        raise ValueError(f"head name {head.name!r}: allowed: lower-case letters, digits and _, not {KINDS_KEY!r}")
    if head.reads not in READS:
        raise ValueError(f"head {head.name!r}: reads {head.reads!r}; allowed: {', '.join(READS)}")
    if not (isinstance(head.params, type) and issubclass(head.params, BaseModel)):
        raise ValueError(f"head {head.name!r}: params must be a pydantic model class, got {head.params!r}")
    old = _SPECS.get(head.name)
    if old is not None and _ref(old.estimator) != _ref(head.estimator):
        raise ValueError(f"head {head.name!r} is already registered, by {_ref(old.estimator)}")
    _SPECS[head.name] = head  # the same estimator again (a module imported twice): the newer spec


def register_head(
    name: str,
    *,
    params: type[BaseModel],
    reads: str,
    warm_start: Callable[[Any], tuple[Any, Any]] | str | None = None,
    estimator: type | str | None = None,
) -> Any:
    """Register head ``name``: a class decorator, or (given ``estimator``) a call returning the spec."""
    if estimator is not None:
        head = HeadSpec(name, params, reads, estimator, warm_start)
        _add(head)
        return head

    def decorate(cls: T) -> T:
        _add(HeadSpec(name, params, reads, cls, warm_start))
        return cls

    return decorate


def unregister_head(name: str) -> None:
    """Forget head ``name`` (tests register throw-away heads)."""
    _SPECS.pop(name, None)


def _discover() -> None:
    """Import every head module of this package once (the built-ins are declared lazily below)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = __name__.rpartition(".")[0]
    lazy = {s.estimator.partition(":")[0] for s in _SPECS.values() if isinstance(s.estimator, str)}
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        module = f"{package}.{info.name}"
        if not (info.name.startswith("_") or info.name in SUPPORT_MODULES or module in lazy):
            importlib.import_module(module)


def specs() -> tuple[HeadSpec, ...]:
    """Every registered head, in registration order (warm-start ties go to the earlier one)."""
    _discover()
    return tuple(_SPECS.values())


def names() -> tuple[str, ...]:
    return tuple(s.name for s in specs())


def spec(name: str) -> HeadSpec:
    """The spec of head ``name``; ParamsError naming the registered heads for any other name."""
    _discover()
    if name not in _SPECS:
        raise ParamsError(f"unknown head kind {name!r}; allowed: {', '.join(_SPECS)}")
    return _SPECS[name]


def construct(cls: type, params: Mapping[str, Any], what: str) -> Any:
    """``cls(**params)``, refusing params its ``__init__`` does not take, naming those it does."""
    allowed = list(cls().get_params(deep=False))
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ParamsError(
            f"{what}: unknown param(s) {', '.join(map(str, unknown))}; allowed: {', '.join(allowed)}"
        )
    return cls(**params)


def make_head(kind: str, params: Mapping[str, Any] | None = None) -> Any:
    """Build an unfitted head of a registered ``kind``, checking its params now.

    Raises ParamsError (a ValueError) for an unknown kind, an unknown param or
    a value out of range (when the estimator has ``_check_params``), naming
    what is allowed.
    """
    head = construct(spec(kind).estimator_class(), dict(params or {}), f"head {kind!r}")
    check = getattr(head, "_check_params", None)
    if callable(check):
        check()
    return head


def _hint(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=CLOSE_MATCHES, cutoff=CLOSE_CUTOFF)
    return f"did you mean {' or '.join(close)}? " if close else ""


def parse_sections(raw: Mapping[str, Any], section: str = "train_head") -> dict[str, Any]:
    """The train_head mapping with every registered head's section parsed by its params model.

    Absent head sections get their model's defaults. Unknown keys (neither
    ``kinds`` nor a registered head) and ``kinds`` naming unregistered heads
    are refused; every problem goes into one ParamsError, each part naming
    its full key.
    """
    known = list(names())
    allowed = [KINDS_KEY, *known]
    problems = [
        f"unknown key '{section}.{key}'; {_hint(str(key), allowed)}allowed: {', '.join(allowed)}"
        for key in raw if key not in allowed
    ]
    kinds = raw.get(KINDS_KEY)
    if isinstance(kinds, list) and all(isinstance(k, str) for k in kinds):  # else pydantic says what is wrong
        unknown = [k for k in kinds if k not in known]
        if unknown:
            hints = "".join(_hint(k, known) for k in unknown)
            problems.append(f"{section}.{KINDS_KEY}: got {kinds!r}; {hints}allowed: registered heads "
                            f"({', '.join(known)}); not registered: {', '.join(unknown)}")
        elif len(set(kinds)) != len(kinds):
            problems.append(f"{section}.{KINDS_KEY}: got {kinds!r}; allowed: each head at most once")
    out = dict(raw)
    for name in known:
        model, value = _SPECS[name].params, raw.get(name)
        try:
            out[name] = value if isinstance(value, model) else parse(model, value, f"{section}.{name}")
        except ParamsError as err:
            problems.append(str(err))
    if problems:
        raise ParamsError("; ".join(problems))
    return out


# The built-in heads, in tie-break order. Declared by name so that nothing here imports torch.
register_head("linear", params=LinearHeadParams, reads="maps",
              estimator="transferlab.models.heads.torch_heads:LinearHead")
# gap reads the pooled vectors: pooling then a linear layer is the same function as a linear layer on
# the pooled vectors extract caches, at 1/(H x W) of the cost (its cam() still takes maps)
register_head("gap", params=GapHeadParams, reads="pooled",
              estimator="transferlab.models.heads.torch_heads:GapHead",
              warm_start="transferlab.models.heads.torch_heads:linear_from_gap")
register_head("svm", params=SvmHeadParams, reads="pooled",
              estimator="transferlab.models.heads.svm:SvmHead",
              warm_start="transferlab.models.heads.svm:linear_from_svm")
