"""The process group seen from a rank: who am I, wait for everyone, what does every rank hold."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch.distributed as dist

from earlybert_pretrain.errors import UserError

T = TypeVar("T")


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextmanager
def leaving_process_group() -> Iterator[None]:
    """A CLI's run: a process group joined inside it is destroyed at its end, error or not. Left to the interpreter's
    exit, gloo's threads can abort the process ("terminate called without an active exception", SIGABRT) after a
    clean one-line error. A group that existed before (a test's) is left alone."""
    joined_before = initialized()
    try:
        yield
    finally:
        if not joined_before and initialized():
            dist.destroy_process_group()


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


def on_main_rank(compute: Callable[[], T]) -> T:
    """Run ``compute`` on rank 0 alone and hand its result to every rank (what only rank 0's disk holds reaches
    the others through the process group). A UserError there is raised on every rank with the same message, so no
    rank waits forever; any other error is raised on rank 0 and reported to the others."""
    outcome: list = [None]
    if rank() == 0:
        try:
            outcome = [("ok", compute())]
        except UserError as err:
            outcome = [("user-error", (type(err), str(err)))]
            if world_size() == 1:
                raise
        except Exception:
            if world_size() > 1:
                dist.broadcast_object_list([("failed", None)], src=0)
            raise
    if world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "user-error":
        error_type, message = value
        raise error_type(message)
    if kind == "failed":
        raise RuntimeError("rank 0 failed (see its traceback); this rank stops too")
    return value
