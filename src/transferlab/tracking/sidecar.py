"""A stage's MLflow tracking in a helper process, opened while the stage imports torch.

Why: importing MLflow and opening its store costs a stage about 2 s of one
core, and importing torch, scikit-learn and the stage's own code about as
much again. Done one after the other in each of the pipeline's dozen stages,
that was a fifth of the demo's ``dvc repro``. :func:`start` launches
``python -m transferlab.tracking.sidecar`` first thing, before the stage's
heavy imports; it opens the store on the other core, then runs the stage's
tracking calls as they arrive over a pipe.

Nothing about a run changes: the helper runs the same code as in-process
tracking (:func:`~transferlab.tracking.runs.begin_stage_run`,
:class:`~transferlab.tracking.runs.StageRun`'s methods,
:func:`~transferlab.tracking.runs.finish_stage_run`), tags the run with the
*stage's* process (so :func:`~transferlab.tracking.runs.mark_orphans` sees it
die) and writes the same run record. Every call waits for its answer, so an
error (a store that cannot be opened, a server lost mid-stage) is raised in
the stage where the call was made, as in-process. When the stage process dies
without a word (SIGKILL, out of memory) the helper reads the end of the pipe
and marks the run KILLED at once.

Stages that need MLflow themselves (evaluate registers the champion through
MLflow's fluent API) keep it in-process: :func:`start` with ``background=False``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Iterator, Mapping

from transferlab.tracking.runs import FAILED, stage_run
from transferlab.tracking.store import TrackingError, open_store

HELPER = "transferlab.tracking.helper"  # the module the helper process runs
HELPER_ENV = "TRANSFERLAB_TRACKING_HELPER"  # "0": track in the stage's own process (bench/demo.py compares both)
# StageRun's methods a stage calls; each becomes one request to the helper
FORWARDED = frozenset({"log_params", "log_metrics", "log_history", "set_tags", "log_artifact", "log_dict"})
POLL_S = 0.5  # how often a stage waiting for an answer checks that the helper still lives
CLOSE_TIMEOUT_S = 30  # a helper that has closed its runs exits at once; this long means it is stuck


class Tracker:
    """What a stage logs through: ``with tracker.stage_run(stage, params, record) as run``."""

    def stage_run(self, stage: str, params: Mapping[str, Any], record: str | Path) -> contextlib.AbstractContextManager:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcess(Tracker):
    """MLflow in the stage's own process: the store is opened here and now."""

    def __init__(self, root: str | Path = ".") -> None:
        self.root = root
        self.store = open_store(root)

    def stage_run(self, stage: str, params: Mapping[str, Any], record: str | Path) -> contextlib.AbstractContextManager:
        return stage_run(stage, params, record, root=self.root, store=self.store)


class Sidecar(Tracker):
    """MLflow in a helper process, started now; the store opens there while this process goes on."""

    def __init__(self, root: str | Path = ".") -> None:
        mine, theirs = socket.socketpair()
        with theirs:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", HELPER, str(theirs.fileno()), str(Path(root))],
                pass_fds=[theirs.fileno()],
            )
        self._conn = Connection(mine.detach())

    def ask(self, *request: Any) -> Any:
        """Send one request and wait for its answer; the helper's error is raised here."""
        try:
            self._conn.send(request)
            while not self._conn.poll(POLL_S):
                if self._proc.poll() is not None:
                    break
            answer = self._conn.recv()
        except (EOFError, OSError):
            code = self._proc.wait()
            raise TrackingError(f"the MLflow tracking process exited (code {code}) before answering "
                                f"{request[0]!r}; its error is printed above") from None
        status, value = answer
        if status == "user":
            raise TrackingError(value)
        if status == "bug":
            raise RuntimeError(f"the MLflow tracking process failed:\n{value}")
        return value

    @contextlib.contextmanager
    def stage_run(self, stage: str, params: Mapping[str, Any], record: str | Path) -> Iterator[RemoteRun]:
        run_id, parent_run_id = self.ask("begin", stage, dict(params), str(record))
        try:
            yield RemoteRun(self, run_id, parent_run_id, stage)
        except BaseException:
            with contextlib.suppress(Exception):  # best effort, as in-process: the error that got us here wins
                self.ask("end", FAILED)
            raise
        self.ask("finish")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.close()  # the helper reads the end of the pipe and exits
        try:
            self._proc.wait(timeout=CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


class RemoteRun:
    """The stage's handle when the helper tracks: StageRun's attributes and methods, each call a request."""

    def __init__(self, sidecar: Sidecar, run_id: str, parent_run_id: str, stage: str) -> None:
        self._sidecar = sidecar
        self.run_id, self.parent_run_id, self.stage = run_id, parent_run_id, stage

    def __getattr__(self, name: str) -> Any:
        if name not in FORWARDED:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r} (it forwards {sorted(FORWARDED)})")
        return lambda *args, **kwargs: self._sidecar.ask("call", name, args, kwargs)


def start(root: str | Path = ".", background: bool = True) -> Tracker:
    """The stage's tracker: a :class:`Sidecar` (where processes can inherit a socket: POSIX), else in-process.

    Call it before the stage's heavy imports; that is the whole point. ``$TRANSFERLAB_TRACKING_HELPER=0``
    keeps tracking in-process everywhere.
    """
    if background and os.name == "posix" and os.environ.get(HELPER_ENV, "1") != "0":
        return Sidecar(root)
    return InProcess(root)
