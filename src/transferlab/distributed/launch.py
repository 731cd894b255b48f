"""Run a stage script under ``torchrun`` when ``params.yaml`` asks for more than one process.

``dvc.yaml`` keeps one plain command per stage (``python pipeline/finetune.py
...``). The script reads ``distributed`` from params.yaml and, when the world
size ``nproc_per_node * nnodes`` is above 1 and it is not already a torchrun
worker, calls :func:`relaunch`: torchrun's own launcher (``torch.distributed.run``,
in this process, so the stage process stays the parent DVC waits on) starts
``nproc_per_node`` copies of the same script with the same arguments, watches
them, and stops them all as soon as one dies. Nothing here is a launcher of our
own: the arguments are torchrun's, and so is the failure detection.

- one node: a standalone rendezvous on a free local port (``rdzv_endpoint`` is
  not used, so two pipelines on one machine never collide);
- several nodes: the static rendezvous at ``rdzv_endpoint`` (node 0 hosts it),
  ``node_rank`` fixed per node, as torchrun's ``--master-addr/--master-port``.

A failed worker becomes a :class:`DistributedError` naming the rank that
failed first, how, and what to do next.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping
from typing import Any, NoReturn

from transferlab.config import DistributedParams
from transferlab.errors import UserError

# torchrun sets these in every worker; TORCHELASTIC_RUN_ID only torchrun does
WORKER_ENV = "TORCHELASTIC_RUN_ID"
RANK_ENV = "RANK"
MONITOR_INTERVAL_S = 0.5  # how often torchrun's agent looks at its workers: a dead one is seen within this


class DistributedError(UserError):
    """A rank failed, or the ranks could not meet: the stage fails with one line naming the rank."""


def under_torchrun() -> bool:
    return WORKER_ENV in os.environ


def is_rank_zero() -> bool:
    """Whether this process logs: the only one, or torchrun's rank 0 (from its variables, as init_ranks reads them)."""
    return os.environ.get("WORLD_SIZE", "1") == "1" or os.environ.get(RANK_ENV, "0") == "0"


def torchrun_args(params: DistributedParams, script: str, argv: list[str], node_rank: int | None = None) -> list[str]:
    """The ``torchrun`` command line (without the program name) for ``script argv`` under ``params``."""
    rank = params.node_rank if node_rank is None else node_rank
    args = [f"--nproc-per-node={params.nproc_per_node}", f"--nnodes={params.nnodes}", "--max-restarts=0",
            f"--monitor-interval={MONITOR_INTERVAL_S}"]
    if params.nnodes == 1:
        args.append("--standalone")
    else:
        host, _, port = params.rdzv_endpoint.rpartition(":")
        args += [f"--node-rank={rank}", f"--master-addr={host.strip('[]')}", f"--master-port={port}",
                 "--rdzv-backend=static", f"--rdzv-conf=timeout={params.timeout_s}"]
    return [*args, script, *argv]


def first_failure(failures: Mapping[int, Any]) -> int:
    """The rank that failed first, among torchrun's failures (``ChildFailedError.failures``).

    torchrun stamps a failure without an error file in whole seconds, and its own
    ``get_first_failure`` then names the lowest rank of a tie: rank 0, when its
    collective saw the killed peer's socket close and it raised, or when torchrun
    itself stopped it with SIGTERM, within the same second. So within one second:
    a rank killed by another signal (SIGKILL, SIGSEGV: the cause), then one that
    exited with an error (its own, or its peer's loss), then one ended by SIGTERM
    (what torchrun sends the ranks still running when it stops them).
    """
    def order(rank: int) -> tuple[int, int, int]:
        code = int(getattr(failures[rank], "exitcode", 1))
        cause = 2 if code == -signal.SIGTERM else 1 if code >= 0 else 0
        return failures[rank].timestamp, cause, rank

    return min(failures, key=order)


def _describe(rank: int, failure: object) -> str:
    code = int(getattr(failure, "exitcode", 1))
    local, pid = getattr(failure, "local_rank", "?"), getattr(failure, "pid", "?")
    if code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"exited with code {code}"
    return f"rank {rank} (local rank {local}, pid {pid}) {how}"


def relaunch(stage: str, params: DistributedParams, node_rank: int | None = None) -> None:
    """Run this script (``sys.argv``) in ``params.world_size`` processes, then exit; return when one is enough.

    Returns at once in a torchrun worker or when the world size is 1: the
    caller goes on as a single process or as its rank. Otherwise it never
    returns: exit 0 when every rank finished, a :class:`DistributedError` naming
    the first rank that failed (torchrun has then stopped the others).
    """
    if under_torchrun() or params.world_size == 1:
        return
    _launch(stage, params, node_rank)


def _launch(stage: str, params: DistributedParams, node_rank: int | None) -> NoReturn:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = torchrun_args(params, sys.argv[0], sys.argv[1:], node_rank)
    where = f"{params.nproc_per_node} process(es) on node {params.node_rank if node_rank is None else node_rank}"
    print(f"{stage}: launching {where} of {params.nnodes} (world size {params.world_size}) through torchrun",
          flush=True)
    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        rank = first_failure(err.failures)
        failure = err.failures[rank]
        others = sorted(set(err.failures) - {rank})
        also = f"; then ranks {others} (their peer gone)" if others else ""
        raise DistributedError(
            f"{_describe(rank, failure)}{also}; torchrun stopped the other ranks and the stage failed. "
            "Run `dvc repro` again once the cause is fixed: finetune resumes from its last checkpoint"
        ) from None
    except Exception as err:  # noqa: BLE001 - the rendezvous raises many kinds (timeout, refused, closed)
        raise DistributedError(f"the ranks could not meet ({type(err).__name__}: {err}); check "
                               f"distributed.rdzv_endpoint {params.rdzv_endpoint!r} and that every node "
                               "was started") from None
    sys.exit(0)
