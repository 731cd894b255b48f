"""Small file helpers: atomic writes and content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import psutil

CHUNK = 1 << 20
DEFAULT_FILE_MODE = 0o666
DEFAULT_DIR_MODE = 0o777


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_prefix(target: Path) -> str:
    # the writer's pid in the name tells a killed writer's leftovers from a live writer's work
    return f".{target.name}.{os.getpid()}."


def _is_debris(name: str, target: Path) -> bool:
    # only names of our own pattern with a dead pid: another target's temporaries (".raw.get.*" beside
    # ".raw.<pid>.*") and live writers' are left alone
    pid = name[len(f".{target.name}."):].split(".", 1)[0]
    return pid.isdigit() and not psutil.pid_exists(int(pid))


def remove_stale_temps(target: str | Path) -> list[Path]:
    """Delete what killed writers of ``target`` left beside it (temporary files and folders), not live ones.

    atomic_path and atomic_dir name their temporaries ``.<target name>.<pid>.*``;
    those whose process no longer runs are debris of a SIGKILL or a crash.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return []
    stale = sorted(p for p in target.parent.glob(f".{target.name}.*") if _is_debris(p.name, target))
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    A crash or an exception leaves ``target`` as it was: never half-written.
    Leftovers of a killed earlier writer are removed first.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=suffix or ".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; outputs should get the usual umask-based mode
    tmp_path.chmod(DEFAULT_FILE_MODE & ~_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` as a whole on success.

    Leftovers of a killed earlier writer (its temporary folder, or the old
    version it was about to delete) are removed first.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))
    tmp.chmod(DEFAULT_DIR_MODE & ~_umask())  # mkdtemp makes 0700 folders
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f"{_temp_prefix(target)}old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def scratch_dir(beside: str | Path, label: str) -> Iterator[Path]:
    """A temporary folder beside ``beside`` (same file system), removed afterwards, or by the next run if killed."""
    target = Path(beside).with_name(f"{Path(beside).name}.{label}")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    with tempfile.TemporaryDirectory(prefix=_temp_prefix(target), dir=target.parent) as tmp:
        yield Path(tmp)


def atomic_write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(target: str | Path, obj: Any) -> None:
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
