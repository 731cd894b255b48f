"""Many processes, one stage: extract and finetune on several GPUs or nodes, on PyTorch's own engine.

- :mod:`~transferlab.distributed.launch`: a stage asked for more than one
  process (``distributed.nproc_per_node * nnodes > 1``) runs itself again under
  ``torchrun`` (``torch.distributed.run``, in this process), and turns a dead
  rank into one line naming it;
- :mod:`~transferlab.distributed.ranks`: inside each process, who it is
  (rank, world size, device) and the few collectives the stages need.

With one process nothing here starts a process group: the stages run as they
always did.
"""

from __future__ import annotations

from typing import Any

from transferlab.distributed.launch import DistributedError, is_rank_zero, relaunch, under_torchrun

_RANKS = frozenset({"SINGLE", "Ranks", "init_ranks", "main_only"})

__all__ = ["DistributedError", "is_rank_zero", "relaunch", "under_torchrun", *sorted(_RANKS)]


def __getattr__(name: str) -> Any:
    # ranks imports torch: loaded on first use, so importing launch stays light and a stage can start its
    # tracker (transferlab.tracking.sidecar) before paying for torch
    if name in _RANKS:
        from transferlab.distributed import ranks

        return getattr(ranks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
