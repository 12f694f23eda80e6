"""The one atomic writer, checked JSON reader and file hasher.

Every output is written under a temp name beside its target, fsynced and renamed over it, so a crash never leaves
half a file (or half a folder). Temp names start with ``TEMP_MARK``: a resumed stage sweeps what a killed run left
with ``remove_stale_temps``. Temp files and folders are created with the process umask's permissions (0o666 / 0o777
masked), not the 0o600 / 0o700 of ``tempfile``, so a group that shares a run can read it once it is renamed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from earlybert_pretrain.errors import UserError

TEMP_MARK = ".tmp-"


def _temp_sibling(path: Path) -> Path:
    # The target's name stays at the end, so writers that go by the suffix (np.save, savefig) see the right one.
    return path.with_name(f"{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}-{path.name}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp file beside ``path``; on success it is fsynced and renamed over ``path``, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        temp = _temp_sibling(path)
        try:
            os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0o666 & ~umask
            break
        except FileExistsError:
            continue
    try:
        yield temp
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except OSError as err:
        if err.filename is not None or err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err  # a failed write names no file: name the target
    finally:
        temp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder beside ``folder``; on success it replaces ``folder`` (whose old contents go),
    on error it is removed and ``folder`` is left as it was."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = _temp_sibling(folder)
    staging.mkdir(mode=0o777)  # masked by the umask, unlike mkdtemp's 0o700
    backup = _temp_sibling(folder)
    try:
        yield staging
        if folder.exists():
            folder.rename(backup)
        staging.rename(folder)
    except BaseException:
        if backup.exists() and not folder.exists():
            backup.rename(folder)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    with contextlib.suppress(OSError):
        remove_entry(backup)  # a linked old folder: the link goes, the folder it points to stays


def remove_entry(path: str | os.PathLike) -> None:
    """Remove a file, a folder tree or a symbolic link itself; never what a link points to (``rmtree`` refuses a
    linked folder, ``is_dir`` would follow it)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(directory: str | os.PathLike) -> None:
    """Delete the temp files and folders a killed writer left in ``directory`` (they never carry a final name)."""
    for stale in Path(directory).glob(f"{TEMP_MARK}*"):
        with contextlib.suppress(OSError):
            remove_entry(stale)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as temp:
        temp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike, what: str, error: type[UserError] = UserError) -> Any:
    """Parse the JSON file ``path``; a missing or unparsable file raises ``error`` naming it and ``what`` it is."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err})") from None
    except RecursionError:  # the parser recurses once per nesting level
        raise error(f"{path}: JSON nested too deeply to read (over {sys.getrecursionlimit()} levels); expected a "
                    f"{what} file") from None


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", block: int = 1 << 20) -> str:
    """Hex digest of a file's bytes (any ``hashlib`` algorithm), read in blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    return file_digest(path, "sha256")
