"""The helper process of :mod:`~transferlab.tracking.sidecar`: ``python -m transferlab.tracking.helper FD ROOT``.

It opens the project's MLflow store, then answers the stage's requests, read
from the inherited socket ``FD``, in order, with the same code in-process
tracking runs. A request's error goes back to the stage as its answer: a
:class:`~transferlab.errors.UserError` as its one line, anything else (a bug)
with its traceback.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any

import psutil

from transferlab.collector import before_exit, importing
from transferlab.errors import UserError
from transferlab.tracking.execution import process_id
from transferlab.tracking.runs import KILLED, StageRun, begin_stage_run, end_stage_run, finish_stage_run, server_kept
from transferlab.tracking.store import Store, open_store


class _Served:
    """The helper's side: one store, at most one stage run, requests answered in order."""

    def __init__(self, root: str, owner: str) -> None:
        self.root, self.owner = root, owner
        self.store: Store | None = None
        self.opening_error: BaseException | None = None
        self.run: StageRun | None = None
        self.key, self.record = "", ""

    def open(self) -> None:
        try:
            self.store = open_store(self.root)
        except Exception as exc:  # noqa: BLE001 - kept for the stage's first request, which raises it there
            self.opening_error = exc

    def handle(self, op: str, *args: Any) -> Any:
        if self.store is None:
            assert self.opening_error is not None
            raise self.opening_error
        if op == "begin":
            stage, params, self.record = args
            self.run, self.key = begin_stage_run(self.store, stage, params, self.root, owner=self.owner)
            return self.run.run_id, self.run.parent_run_id
        assert self.run is not None, f"{op!r} before 'begin'"
        if op == "call":
            name, call_args, kwargs = args
            with server_kept(self.store, self.run.stage):
                getattr(self.run, name)(*call_args, **kwargs)
        elif op == "end":
            end_stage_run(self.store, self.run, args[0])
            self.run = None
        elif op == "finish":
            finish_stage_run(self.store, self.run, self.key, self.record)
            self.run = None
        else:
            raise ValueError(f"unknown request {op!r}")
        return None

    def abandoned(self) -> None:
        """The stage process closed the pipe with a run still open: it died (or was killed) mid-stage."""
        if self.run is not None and self.store is not None:
            end_stage_run(self.store, self.run, KILLED)


def serve(conn: Connection, root: str) -> None:
    """Open the store, then answer the stage's requests until it closes the pipe."""
    served = _Served(root, process_id(psutil.Process(os.getppid())))
    with importing():  # MLflow
        served.open()
    while True:
        try:
            request = conn.recv()
        except EOFError:
            served.abandoned()
            before_exit()
            return
        try:
            answer: tuple[str, Any] = ("ok", served.handle(*request))
        except UserError as exc:
            answer = ("user", str(exc))
        except Exception:  # noqa: BLE001 - a bug: its traceback goes to the stage, which raises it
            answer = ("bug", traceback.format_exc())
        conn.send(answer)


if __name__ == "__main__":
    # Ctrl-C reaches the whole process group: the stage decides (it ends the run FAILED), not the helper
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve(Connection(int(sys.argv[1])), sys.argv[2])
