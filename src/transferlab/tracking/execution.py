"""What counts as one pipeline execution, and who ran it.

All stages that one ``dvc repro`` / ``dvc exp run`` / ``make demo`` runs are
children of one parent run. Stages run as separate processes, so they agree on
an *execution key*: a hash of

- the git commit,
- ``DVC_EXP_NAME`` (set by ``dvc exp run``),
- the hash of the whole ``params.yaml``,
- the identity (pid + start time) of the ``dvc`` process that launched the
  stage, the nearest ``dvc`` ancestor in the process tree (psutil).

Without a ``dvc`` ancestor (a stage run by hand) the first three parts alone
decide. ``TRANSFERLAB_EXECUTION`` overrides the whole key when set.

Nothing in the key may change while one ``dvc repro`` runs. So the git dirty
flag is not part of it (it is still tagged on every run): DVC rewrites
``dvc.lock`` after each stage, and where a team commits ``dvc.lock`` (DVC's own
workflow) the tree turns dirty between the first stage and the second. And a
process's start time is counted from boot, not read from the wall clock, which
NTP may step while a pipeline runs.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
from pathlib import Path

import psutil

EXECUTION_ENV = "TRANSFERLAB_EXECUTION"
EXP_NAME_ENV = "DVC_EXP_NAME"
MAX_ANCESTORS = 32


def git_state(root: str | Path = ".") -> tuple[str, bool]:
    """(commit, dirty) of the repo at ``root``; ("none", True) outside git."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "none", True
    return commit, dirty


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of ``pid`` from Linux's /proc/<pid>/stat; None without it.

    Read by hand because psutil's public ``create_time()`` adds the boot time
    as the wall clock sees it now, which moves when the clock is stepped: the
    same process would get another identity mid-pipeline (psutil keeps the
    monotonic value for its own identity checks, privately).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[0], fields[19]  # fields 3 (state) and 22 (starttime), counted from pid as 1


def process_id(process: psutil.Process) -> str:
    """pid:start-time, which (unlike a bare pid) is never reused.

    Raises ``psutil.NoSuchProcess`` (or its ``ZombieProcess``) when the process is gone.
    """
    stat = _proc_stat(process.pid)
    if stat is None:  # gone, or no procfs (macOS, Windows): psutil's wall-clock start time, which raises if gone
        return f"{process.pid}:{process.create_time():.3f}"
    state, ticks = stat
    if state == "Z":
        raise psutil.ZombieProcess(process.pid)
    return f"{process.pid}:t{ticks}"


def _is_dvc(process: psutil.Process) -> bool:
    try:
        argv = process.cmdline()[:3]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return "dvc" in (Path(a).name for a in argv)


def dvc_invoker() -> str | None:
    """Identity of the nearest ``dvc`` ancestor process, if any."""
    try:
        ancestors = psutil.Process().parents()[:MAX_ANCESTORS]
    except psutil.Error:
        return None
    return next((process_id(p) for p in ancestors if _is_dvc(p)), None)


def this_process() -> str:
    return process_id(psutil.Process())


BOOT_ID = Path("/proc/sys/kernel/random/boot_id")  # Linux: a random id drawn at every boot


def host_id() -> str:
    """This machine (and boot): pids are only comparable within it.

    The boot's own id where the kernel has one; elsewhere the boot time, which
    a stepped clock can move (then orphans of this boot go unmarked, no worse).
    """
    try:
        boot = BOOT_ID.read_text().strip()
    except OSError:
        boot = f"{psutil.boot_time():.0f}"
    return f"{socket.gethostname()}@{boot}"


def is_alive(identity: str) -> bool:
    """Whether the process ``pid:start-time`` (see :func:`process_id`) still runs on this host."""
    pid, _, start = identity.partition(":")
    try:
        return process_id(psutil.Process(int(pid))) == f"{pid}:{start}"
    except (psutil.NoSuchProcess, ValueError):
        return False
    except psutil.Error:
        return True  # it exists but cannot be inspected: assume it is someone else's live process


def execution_key(root: str | Path = ".", params_file: str | Path = "params.yaml") -> str:
    override = os.environ.get(EXECUTION_ENV)
    if override:
        return override
    commit, _ = git_state(root)  # not the dirty flag: see the module's docstring
    path = Path(root) / params_file
    params_digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""
    parts = [commit, os.environ.get(EXP_NAME_ENV, ""), params_digest, dvc_invoker() or ""]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]
