"""The working checkpoint ``checkpoint.pt``: exact resume after a crash, and the run's identity.

After every finished epoch the checkpoint (model, optimiser, scheduler, AMP
scaler, early-stopping state, history and RNG states) is replaced
atomically. A rerun whose identity (params, weights, data, warm-start head,
training code) matches continues after the last finished epoch and ends
bit-identical to an uninterrupted run on CPU (same torch build and thread
count); with a different identity it starts fresh and says what changed.
"""

from __future__ import annotations

import importlib
import json
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from transferlab.io import atomic_path, remove_stale_temps, sha256_file
from transferlab.loop import LoopState
from transferlab.training.strategy import Session

__all__ = ["FORMAT_VERSION", "checkpoint", "code_digests", "differences", "identity", "read", "restore", "save"]

from transferlab.models.finetuned import FORMAT_VERSION  # noqa: E402 - model.json and checkpoint.pt share it
PACKAGE = Path(__file__).resolve().parents[1]  # src/transferlab
# The code whose change must retrain rather than reuse a checkpoint: modules, and whole packages.
CODE_MODULES = (
    "transferlab.training.finetune", "transferlab.training.strategy", "transferlab.training.images",
    "transferlab.training.warm_start", "transferlab.training.checkpoint", "transferlab.loop",
    "transferlab.models.finetuned", "transferlab.distributed.ranks",
)
CODE_PACKAGES = ("transferlab.models.backbones",)

Echo = Callable[[str], None]


def _files() -> list[Path]:
    files = [Path(str(importlib.import_module(m).__file__)) for m in CODE_MODULES]
    for name in CODE_PACKAGES:
        package = importlib.import_module(name)
        files += sorted(p for folder in package.__path__ for p in Path(folder).glob("*.py"))
    return files


def code_digests() -> dict[str, str]:
    """sha256 of every training-code file, keyed by its path under src/transferlab."""
    return {path.resolve().relative_to(PACKAGE).as_posix(): sha256_file(path) for path in _files()}


def identity(job: Any, backbone: Any, data: Any, warm: Any, world: int = 1) -> dict[str, Any]:
    """What a checkpoint must match to be resumed, or to count as this run's finished result.

    Params, weights, data, warm-start head, and the training code: a DVC rerun
    after a code change must train again, not rewrite outputs from a checkpoint
    the old code made. ``finetune.backbones`` is left out: adding another
    backbone to the list must not restart this one. ``world``: the number of
    data-parallel ranks (their shards and augmentation streams are part of the
    run), so a checkpoint resumes only with as many ranks as made it.
    """
    params = job.params.model_dump(exclude={"backbones"})
    ident = {
        "backbone": job.backbone,
        "weights": backbone.weights_id,
        "params": params,
        "classes": data.classes,
        "split_sha256": data.sha256,
        "init": None if warm is None else {"head": warm.kind, "sha256": warm.sha256},
        "code": code_digests(),
        "world_size": world,
    }
    return json.loads(json.dumps(ident))  # the plain types a weights_only load gives back


def checkpoint(session: Session, state: LoopState, ident: dict[str, Any],
               rank_rngs: list[Any] | None = None) -> dict[str, Any]:
    """Plain dict of state dicts, numbers, strings and lists: loads with weights_only=True.

    ``rank_rngs``: every rank's torch RNG state, in rank order (data-parallel runs).
    """
    cuda_rng = torch.cuda.get_rng_state_all() if session.device.type == "cuda" else []
    return {
        "format": FORMAT_VERSION,
        "params": ident,
        "model": session.model.state_dict(),
        "optimizer": session.optimizer.state_dict(),
        "scheduler": session.scheduler.state_dict(),
        "scaler": session.scaler.state_dict(),
        "epoch": state.epoch,
        "best_model": state.best_state,
        "best_metric": state.best_metric,
        "best_epoch": state.best_epoch,
        "bad_epochs": state.bad_epochs,
        "history": state.history,
        "rng": {"torch": torch.get_rng_state(), "loader": session.generator.get_state(), "cuda": cuda_rng,
                "ranks": list(rank_rngs or [])},
    }


def save(path: Path, data: dict[str, Any]) -> None:
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(data, tmp)


def read(path: Path, note: Echo) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or None (absent, unreadable, another format: said through ``note``)."""
    for stale in remove_stale_temps(path):  # a SIGKILL during a save leaves its temporary behind
        note(f"removed {stale.name}, left by an interrupted checkpoint write")
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        # Written atomically, so this means another torch version or a foreign file: it is only a resume aid.
        note(f"cannot read {path} ({err}); starting fresh")
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
        note(f"{path} is not a format-{FORMAT_VERSION} finetune checkpoint; starting fresh")
        return None
    return data


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(obj, Mapping):
        return {prefix: obj}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def differences(old: Any, new: Any) -> list[str]:
    a, b = _flat(old), _flat(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def restore(session: Session, data: dict[str, Any]) -> LoopState:
    """Load model, optimiser, scheduler, scaler and RNG states into ``session``; return the loop state."""
    session.model.load_state_dict(data["model"])
    session.optimizer.load_state_dict(data["optimizer"])
    session.scheduler.load_state_dict(data["scheduler"])
    if session.amp and data["scaler"]:
        session.scaler.load_state_dict(data["scaler"])
    rng = data["rng"]
    ranks = session.ranks
    torch.set_rng_state(rng["ranks"][ranks.rank] if ranks.distributed else rng["torch"])
    session.generator.set_state(rng["loader"])
    if session.device.type == "cuda" and rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    best = data["best_model"]
    return LoopState(
        best_metric=float(data["best_metric"]),
        best_state=None if best is None else {k: v.to(session.device) for k, v in best.items()},
        epoch=int(data["epoch"]),
        best_epoch=int(data["best_epoch"]),
        bad_epochs=int(data["bad_epochs"]),
        history=list(data["history"]),
    )
