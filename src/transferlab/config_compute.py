"""The sections that say where the work runs: ``compute`` (the device) and ``distributed`` (how many processes).

Part of the params models of :mod:`transferlab.config`, which re-exports them
(kept apart only so each module stays small).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from transferlab.validation import Section, _problem

DEVICE_FORMS = "auto, cpu, cuda, cuda:N, mps"
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


class ComputeParams(Section):
    """Where torch runs (``auto``: CUDA, then MPS, then CPU) and how many DataLoader decode workers."""

    device: str = "auto"
    # None: sized for the device by transferlab.device.decode_workers; 0 decodes in the main process
    num_workers: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _device(self) -> ComputeParams:
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise _problem("device", self.device, DEVICE_FORMS)
        return self


# host:port of the rendezvous (torchrun's c10d store, on node 0); a port only: 127.0.0.1 and that port
ENDPOINT_PATTERN = re.compile(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}")


class DistributedParams(Section):
    """How many processes extract and finetune run in, on how many nodes (``torchrun``'s own terms).

    ``nproc_per_node * nnodes`` is the world size: 1 runs the stage plainly, in
    one process; more launches it through ``python -m torch.distributed.run``
    (:mod:`transferlab.distributed`). ``backend`` auto: NCCL where the stage runs
    on CUDA, Gloo elsewhere. ``timeout_s`` bounds every collective: a rank that
    stops answering fails the stage after at most that long, never hangs it.
    """

    nproc_per_node: int = Field(1, ge=1)  # processes on this node (one per GPU on a GPU box)
    nnodes: int = Field(1, ge=1)
    node_rank: int = Field(0, ge=0)  # this node's place among nnodes (0 hosts the rendezvous)
    rdzv_endpoint: str = "127.0.0.1:29500"  # node 0's host:port, reachable from every node
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_s: int = Field(300, ge=10)  # collective timeout (init_process_group), seconds

    @model_validator(mode="after")
    def _node(self) -> DistributedParams:
        if self.node_rank >= self.nnodes:
            raise _problem("node_rank", self.node_rank, f"0 to nnodes - 1 ({self.nnodes - 1})")
        if not ENDPOINT_PATTERN.fullmatch(self.rdzv_endpoint):
            raise _problem("rdzv_endpoint", self.rdzv_endpoint, "host:port, e.g. 10.0.0.1:29500")
        return self

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes
