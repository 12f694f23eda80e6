"""The process group seen from a rank: who am I, wait for everyone, what does every rank hold."""

from __future__ import annotations

import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if initialized():
        dist.barrier()


def from_every_rank(value: object) -> list:
    """``value`` as held by every rank, in rank order (a picklable object)."""
    if world_size() == 1:
        return [value]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered
