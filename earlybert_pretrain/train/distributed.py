"""The process group seen from a rank: who am I, wait for everyone, what does every rank hold; its life (created and
destroyed by the call that needed it), start-up checks every rank agrees on, and a lost rank as one line."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch.distributed as dist

from earlybert_pretrain.common.oserrors import user_filesystem_errors
from earlybert_pretrain.errors import LostRankError, UserError

T = TypeVar("T")

# What a launcher sets; init_distributed fills them in for a lone process, and leaving_process_group restores them.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextmanager
def leaving_process_group() -> Iterator[None]:
    """The life of a recipe's process group (also a decorator: ``@leaving_process_group()``). A group created inside
    is destroyed at the end, error or not, with DeepSpeed's cached handles to it and the launcher variables filled in
    for a lone process, so the next call in this process starts as this one did; a group that existed before (the
    caller's) is left alone. A collective that fails because another rank died or stalled leaves as one
    ``LostRankError`` line naming that rank.

    Why destroy at all: left to the interpreter's exit, gloo's threads can abort the process ("terminate called
    without an active exception", SIGABRT) after a clean one-line error. Why through DeepSpeed: a plain torch destroy
    leaves DeepSpeed's cached groups naming the dead group, and the next ``deepspeed.initialize`` fails ("Group ... is
    not registered")."""
    joined_before = initialized()
    environment = {key: os.environ.get(key) for key in LAUNCHER_ENV}
    try:
        with _lost_ranks_reported():
            yield
    finally:
        if not joined_before and initialized():
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()  # also releases deepspeed.utils.groups' references
        if not joined_before:
            for key, value in environment.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _peer_failure(err: BaseException) -> str | None:
    """How a collective failed because of another rank: "stalled" (no answer within the group's timeout), "gone"
    (its connection closed: killed, crashed), or None for any other error (a bug keeps its traceback). gloo raises a
    plain RuntimeError from its transport; NCCL and the rendezvous store raise torch's DistError family."""
    text = str(err)
    if not (isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and "gloo/transport" in text)):
        return None
    return "stalled" if "timed out" in text.lower() else "gone"


@contextmanager
def _lost_ranks_reported() -> Iterator[None]:
    try:
        yield
    except RuntimeError as err:
        how = _peer_failure(err)
        if how is None:
            raise
        if not initialized():  # the rendezvous: the group was never made
            raise LostRankError(
                f"not every rank joined the process group within collective_timeout_s (WORLD_SIZE="
                f"{os.environ.get('WORLD_SIZE')}, MASTER_ADDR:MASTER_PORT={os.environ.get('MASTER_ADDR')}:"
                f"{os.environ.get('MASTER_PORT')}): a rank failed before joining (see its log) or cannot reach that "
                f"address") from None
        if world_size() == 1:
            raise
        me = rank()
        # Which peer: the only other one of two ranks; gloo's message names an address, not a rank.
        peer = f"rank {1 - me}" if world_size() == 2 else "another rank"
        what = (f"{peer} did not answer within collective_timeout_s (stopped, or stuck in a read)" if how == "stalled"
                else f"{peer} is gone (its connection closed: it crashed or was killed; see its log)")
        raise LostRankError(f"{what}; rank {me} of {world_size()} stopped too. Restart the run with --resume: it "
                            f"continues from its last complete checkpoint") from None


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
        raise LostRankError(f"rank 0 failed (its traceback is in its log); rank {rank()} stopped too")
    return value


@contextmanager
def agreed() -> Iterator[None]:
    """Start-up checks every rank agrees on: each rank runs the block, then one collective shares every rank's
    pass or fail, so a check failing on one rank alone (a folder it cannot write, shards it cannot see, rank 0's run
    lock) stops every rank at once instead of leaving the others in their next collective until the timeout.

    A user error (a file-system error the user can fix included) is raised on every rank with the message of the
    lowest failing rank, prefixed by that rank when other ranks passed. Any other error keeps its traceback on its
    rank; the others raise ``LostRankError`` naming it."""
    failure, outcome = None, None
    try:
        with user_filesystem_errors():
            yield
    except UserError as err:
        failure, outcome = err, ("user-error", type(err), str(err))
    except Exception as err:
        failure, outcome = err, ("failed", None, f"{type(err).__name__}: {err}")
    outcomes = from_every_rank(outcome)
    failed = [index for index, seen in enumerate(outcomes) if seen is not None]
    if not failed:
        return
    first = failed[0]
    if outcome is not None and (outcome[0] == "failed" or (first == rank() and len(failed) == len(outcomes))):
        raise failure  # this rank's bug, or every rank failed (a config error) and this is the first: as raised
    kind, error_type, message = outcomes[first]
    if kind == "failed":
        raise LostRankError(f"rank {first} failed at start-up ({message}; its traceback is in its log); rank "
                            f"{rank()} stopped too")
    raise error_type(message if len(failed) == len(outcomes) else f"rank {first}: {message}")


@contextmanager
def agreed_context(manager: contextlib.AbstractContextManager[T]) -> Iterator[T]:
    """Enter ``manager`` (e.g. the run lock rank 0 alone takes) agreed as in ``agreed``; held for the block."""
    with contextlib.ExitStack() as stack:
        with agreed():
            value = stack.enter_context(manager)
        yield value
