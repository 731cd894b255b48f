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

from transferlab.distributed.launch import DistributedError, relaunch, under_torchrun
from transferlab.distributed.ranks import SINGLE, Ranks, init_ranks, main_only

__all__ = ["SINGLE", "DistributedError", "Ranks", "init_ranks", "main_only", "relaunch", "under_torchrun"]
