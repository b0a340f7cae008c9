"""torchrun / DDP plumbing shared by both stages.

Under ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK in the environment) the process group is
initialised with NCCL on CUDA and gloo on CPU; otherwise everything runs as a single process
with rank 0. Only rank 0 writes checkpoints, logs progress bars and runs evaluation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
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
