"""Inside one process of a stage: its rank, the world, its device and the collectives the stages use.

:func:`init_ranks` joins the process group torchrun prepared (the ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` variables it sets) with a timeout on every
collective (``distributed.timeout_s``), so a rank that stops answering fails
the others within that time instead of hanging them. Outside torchrun it
returns :data:`SINGLE`, whose collectives are identities: the single-process
code path is the same code.

Object collectives (feature batches, checkpoints, RNG states) go through a Gloo
group on the CPU whatever the backend: their data lives on the CPU, and NCCL's
object collectives would copy it through the GPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch

from transferlab.config import DistributedParams


@dataclass(frozen=True)
class Ranks:
    """This process's place in the world. ``group``: the Gloo group for object collectives (None: one process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    node_rank: int = 0
    group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def device(self, device: torch.device) -> torch.device:
        """One GPU per rank on a node: ``cuda`` becomes ``cuda:<local rank>``."""
        if self.distributed and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def sum(self, values: list[float]) -> list[float]:
        """Elementwise sum over the ranks (float64), the same on every rank."""
        if not self.distributed:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj``, in rank order, on rank 0; None elsewhere."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (what rank 0 decided is what every rank does)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def interleave(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows sharded as ``items[rank::world]`` (:meth:`shard`), gathered back in the items' order, on every rank."""
        if not self.distributed:
            return rows
        parts = self.all_gather(rows.cpu())
        out = torch.empty((sum(len(p) for p in parts), *rows.shape[1:]), dtype=rows.dtype)
        for r, part in enumerate(parts):
            out[r :: self.world] = part
        return out.to(rows.device)

    def shard(self, items: list[Any]) -> list[Any]:
        """This rank's items: every ``world``-th from ``rank`` (disjoint, together all of them)."""
        return items[self.rank :: self.world]


SINGLE = Ranks()


def _backend(setting: str, device: torch.device) -> str:
    if setting != "auto":
        return setting
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def init_ranks(params: DistributedParams, device: torch.device) -> Iterator[Ranks]:
    """Join torchrun's process group for the stage's duration; :data:`SINGLE` outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or "RANK" not in os.environ:
        yield SINGLE
        return
    import torch.distributed as dist

    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            from transferlab.distributed.launch import DistributedError

            raise DistributedError(f"distributed.nproc_per_node: got {params.nproc_per_node}; allowed: at most "
                                   f"the {torch.cuda.device_count()} CUDA device(s) of this node (one per rank)")
        torch.cuda.set_device(local_rank)
    backend = _backend(params.backend, device)
    timeout = timedelta(seconds=params.timeout_s)
    dist.init_process_group(backend, timeout=timeout)
    group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), local_rank, int(os.environ.get("GROUP_RANK", "0")), group)
    try:
        yield ranks
        dist.barrier(group=group)  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()


class _NoRun:
    """What a rank other than 0 gets for its MLflow run: every logging call does nothing."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def main_only(ranks: Ranks, open_run: Callable[[], Any]) -> Iterator[Any]:
    """``open_run()`` (a stage run context) on rank 0; elsewhere a run that logs nothing: one run per stage."""
    if ranks.is_main:
        with open_run() as run:
            yield run
    else:
        yield _NoRun()
