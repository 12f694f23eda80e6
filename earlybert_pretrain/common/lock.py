"""One run per folder: an exclusive advisory lock on a file inside the folder, held for the run's life.

``fcntl.flock`` locks belong to the open file: the OS drops them when the holder exits, however it exits (SIGKILL,
OOM), so a crashed run never blocks the next one; its lock file stays behind, naming a dead pid, and is simply taken
over. The holder writes its pid and host into the lock file, so a second taker can name who is running there.

A run that ends (or fails) removes the lock file, and the folder when the lock created it and nothing else came
into it, so a refused command leaves the disk as it found it. Removal happens while the lock is held; a taker
checks after locking that the path still names the file it locked, and retries otherwise.

flock is advisory, and on some network file systems (older NFS clients) local to one node: the lock then guards
against a second run on the same node only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from earlybert_pretrain.errors import RunError

LOCK_FILE = ".earlybert.lock"
NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)  # a file system without locking (NFS without lockd)


def _holder(handle) -> str:
    """Who holds the lock, as written by them ("pid 123 on host-a"), or "another process" when unreadable."""
    try:
        handle.seek(0)
        holder = json.loads(handle.read() or "{}")
        return f"pid {int(holder['pid'])} on {holder['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _open_locked(lock_path: Path, what: str):
    """Open ``lock_path`` and lock it exclusively; the open handle, or RunError naming the holder."""
    while True:
        existed = lock_path.exists()
        handle = open(lock_path, "a+", encoding="utf-8")  # a+: never truncate what a holder wrote
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _holder(handle)
            handle.close()
            if err.errno in NO_LOCKS:
                if not existed:  # nobody can hold a lock here: the file just made is ours to remove
                    lock_path.unlink(missing_ok=True)
                raise RunError(f"{lock_path}: this file system refuses locks ({err.strerror or err}; e.g. NFS "
                               "without lockd): run the lock daemon, mount with -o local_lock=flock (locks then hold "
                               "within one node), or choose an output folder on another file system") from None
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunError(f"{lock_path}: cannot lock ({err.strerror or err})") from None
            raise RunError(f"{lock_path.parent}: another {what} is using this folder ({holder}; lock file "
                           f"{lock_path}); wait for it to finish or stop it") from None
        try:
            same_file = os.path.samestat(os.fstat(handle.fileno()), os.stat(lock_path))
        except FileNotFoundError:
            same_file = False
        if same_file:
            return handle
        handle.close()  # the holder removed it as we locked: lock the new one


@contextlib.contextmanager
def hold_run_lock(folder: str | os.PathLike, what: str = "run") -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (created if missing) for the block; yields the lock file's path.

    A folder already locked raises ``RunError`` naming the folder, the holder's pid and host. ``what`` names the kind
    of run in that message ("pre-training run", "shard stage").
    """
    folder = Path(folder)
    lock_path = folder / LOCK_FILE
    if folder.exists() and not folder.is_dir():
        raise RunError(f"{folder}: is a file, expected a folder")
    created = [path for path in (folder, *folder.parents) if not path.exists()]  # innermost first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = _open_locked(lock_path, what)
    except RunError:
        _remove_empty(created)
        raise
    except OSError as err:
        _remove_empty(created)
        raise RunError(f"{lock_path}: cannot create the run lock ({err.strerror or err})") from None
    with handle:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
        handle.flush()
        try:
            yield lock_path
        finally:
            lock_path.unlink(missing_ok=True)
            _remove_empty(created)


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders the lock created (innermost first) while nothing else came into them."""
    for path in created:
        if not path.is_dir() or any(path.iterdir()):
            return
        path.rmdir()
