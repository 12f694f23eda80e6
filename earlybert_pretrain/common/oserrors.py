"""File-system failures the user can fix (read-only, full disk, permission denied, a file where a folder belongs) as
one ``UserError`` line naming the path and the cause.

Only these errnos are translated: any other ``OSError`` (a missing internal file, a bad descriptor) is a bug and
keeps its traceback. The CLIs wrap their command in ``user_filesystem_errors``; the writers underneath stay plain.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from earlybert_pretrain.errors import UserError

USER_ERRNOS = frozenset({
    errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
    errno.ENAMETOOLONG,
})


class FileSystemError(UserError):
    """A path the run cannot read or write: the message names it and the operating system's reason."""


def describe(err: OSError, where: str | os.PathLike | None = None) -> str:
    """``path: reason`` for ``err``; ``where`` names the place when the OS names no path (a full disk on write)."""
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None] or ([str(where)] if where else [])
    reason = err.strerror or str(err)
    return f"{' -> '.join(paths) or 'output'}: {reason}" + ("" if err.filename else " (while writing there)")


@contextlib.contextmanager
def user_filesystem_errors(where: str | os.PathLike | None = None) -> Iterator[None]:
    """Re-raise a user-fixable ``OSError`` of the block as ``FileSystemError`` (one line); others pass through."""
    try:
        yield
    except OSError as err:
        if err.errno not in USER_ERRNOS:
            raise
        raise FileSystemError(describe(err, where)) from err
