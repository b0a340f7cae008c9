"""torchrun / DDP plumbing shared by both stages.

Under ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK in the environment) the process group is
initialised with NCCL on CUDA and gloo on CPU; otherwise everything runs as a single process
with rank 0. Only rank 0 writes checkpoints, logs progress bars and runs evaluation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import structlog
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job and which device it drives."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.barrier()


def resolve_device(preference: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; anything else is taken literally."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def init_distributed(device: str = "auto") -> DistributedContext:
    """Join the torchrun job if there is one (idempotent), else return a single-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = resolve_device(device)
    if world_size > 1:
        if chosen.type == "cuda":
            torch.cuda.set_device(local_rank)
            chosen = torch.device("cuda", local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen)


#: How long a rank waits at the end for the others before it leaves the process group anyway (s).
SHUTDOWN_BARRIER_SECONDS = 120.0


def shutdown_distributed() -> None:
    """Leave the process group once every rank got here (at most `SHUTDOWN_BARRIER_SECONDS`).

    Rank 0 evaluates and packages alone at the end; a rank that tore its gloo group down and exited
    meanwhile was seen to abort in its exit ("terminate called without an active exception", exit -6)
    once in a full test run. Waiting for each other first means no rank leaves while another still
    holds the group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=SHUTDOWN_BARRIER_SECONDS))
        else:
            dist.barrier()
    except RuntimeError as exc:  # another rank failed or is gone: leave anyway
        structlog.get_logger(__name__).warning("distributed_shutdown_barrier_failed", error=str(exc)[:200])
    dist.destroy_process_group()


def broadcast_flag(context: DistributedContext, value: bool) -> bool:
    """Rank 0's decision, on every rank (e.g. "stop early")."""
    if not context.distributed:
        return value
    tensor = torch.tensor([1 if value else 0], dtype=torch.int64)
    if context.device.type == "cuda":
        tensor = tensor.to(context.device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())
