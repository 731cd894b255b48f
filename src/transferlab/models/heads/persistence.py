"""Pickle-free persistence of fitted heads: safetensors arrays plus a JSON sidecar.

``head.save(path)`` writes ``path`` (safetensors with the arrays) and a JSON
sidecar ``<path>.json`` (class, params, classes, shapes, history and the
sha256 of ``path``); :func:`load_head` reads both back without unpickling
anything. Each file is written atomically; the checksum in the sidecar catches
a pair that does not belong together (e.g. a crash between the two renames).

Only classes of registered heads are loaded (by class name), so a sidecar can
never make this module instantiate anything else. A head implements ``save``
(usually with :func:`head_meta` and :func:`save_arrays` or :func:`write_pair`)
and ``_restore(meta, path)``, which sets the fitted attributes on an instance
built from the saved params.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from sklearn.base import BaseEstimator

from transferlab.io import atomic_path, atomic_write_json, sha256_file
from transferlab.models.heads import registry

__all__ = ["FORMAT_VERSION", "head_meta", "load_arrays", "load_head", "save_arrays", "sidecar", "write_pair"]

# Bumped when the on-disk layout changes, so old files fail with a clear message.
FORMAT_VERSION = 1


def plain(value: Any) -> Any:
    """Convert numpy scalars/arrays to JSON-native values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def sidecar(path: Path) -> Path:
    # Appending (rather than replacing the suffix) can never collide with ``path``.
    return path.with_name(path.name + ".json")


EXECUTION_PARAMS = ("device",)  # where a head ran, not what it learned: a saved head loads anywhere


def saved_params(estimator: BaseEstimator) -> dict[str, Any]:
    params = {k: plain(v) for k, v in estimator.get_params(deep=False).items() if k not in EXECUTION_PARAMS}
    if not (params.get("random_state") is None or isinstance(params["random_state"], int)):
        # A RandomState object cannot be stored; the saved weights do not need it.
        params["random_state"] = None
    return params


def head_meta(head: Any, **extra: Any) -> dict[str, Any]:
    """The sidecar fields every head writes (format, class, params, classes, C), plus ``extra``."""
    return {
        "format": FORMAT_VERSION,
        "class": type(head).__name__,
        "params": saved_params(head),
        "classes": plain(head.classes_),
        **extra,
    }


def write_pair(path: str | Path, data: bytes, meta: dict[str, Any]) -> None:
    """Write the serialized arrays, then the sidecar naming their checksum."""
    path = Path(path)
    with atomic_path(path, suffix=".safetensors") as tmp:
        tmp.write_bytes(data)  # into the prepared temp file: keeps the mode atomic_path gave it
        meta = {**meta, "sha256": sha256_file(tmp)}
    atomic_write_json(sidecar(path), meta)


def save_arrays(path: str | Path, arrays: Mapping[str, np.ndarray], meta: dict[str, Any]) -> None:
    """``write_pair`` for numpy arrays (stored contiguous, in their own dtype)."""
    data = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
    write_pair(path, data, meta)


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(str(path))


def _classes_by_name() -> dict[str, type]:
    return {cls.__name__: cls for cls in (s.estimator_class() for s in registry.specs())}


def load_head(path: str | Path) -> Any:
    """Load a head written by ``save(path)``: reads ``path`` and ``<path>.json``."""
    path = Path(path)
    meta = json.loads(sidecar(path).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported head format {meta.get('format')!r}; expected {FORMAT_VERSION}")
    by_name = _classes_by_name()
    if meta.get("class") not in by_name:
        raise ValueError(f"{path}: unknown head class {meta.get('class')!r}; allowed: {', '.join(by_name)}")
    digest = sha256_file(path)
    if digest != meta.get("sha256"):
        raise ValueError(
            f"{path}: checksum {digest} does not match its sidecar ({meta.get('sha256')}); "
            "the pair is inconsistent"
        )
    head = registry.construct(by_name[meta["class"]], meta["params"], str(path))
    head._restore(meta, path)
    return head
