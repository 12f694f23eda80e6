"""Helpers shared by the stages: the error type, atomic writes, hashing, stage manifests, worker pools."""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
TMP_MARK = ".tmp-"


class PrepError(ValueError):
    """An error the user can cause (bad input file, corrupt dump, wrong vocab); the message names the file."""


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def tmp_name(path: Path) -> Path:
    # Same directory as the target so the final os.replace is an atomic rename, never a copy.
    return path.with_name(f"{TMP_MARK}{os.getpid()}-{path.name}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block finishes."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def remove_stale_tmp(directory: Path) -> None:
    """Delete temp files a killed run left behind (they never carry a final name)."""
    for stale in directory.glob(f"{TMP_MARK}*"):
        stale.unlink(missing_ok=True)


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PrepError(f"{path}: not valid JSON ({exc})") from exc


def require_manifest(directory: str | Path, stage: str) -> dict[str, Any]:
    manifest = read_manifest(directory)
    if manifest is None or manifest.get("stage") != stage:
        raise PrepError(f"{Path(directory) / MANIFEST}: missing or not a '{stage}' manifest; run `{stage}` first")
    return manifest


def stage_done(directory: Path, stage: str, params: dict[str, Any]) -> dict[str, Any] | None:
    """Return the stage's manifest if it was completed with exactly these parameters (then the stage is skipped)."""
    manifest = read_manifest(directory)
    if manifest and manifest.get("stage") == stage and manifest.get("params") == params:
        return manifest
    return None


def begin_stage(directory: Path, params: dict[str, Any], outputs: list[str]) -> None:
    """Make ``directory`` ready to (re)run a stage with ``params``.

    Output files (glob ``outputs``) of an interrupted run with the same parameters are kept, so the stage resumes;
    those of a run with other parameters (a finished one, or one recorded in ``params.json``) are deleted, so they
    are never mistaken for finished work.
    """
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(directory)
    params_file = directory / "params.json"
    recorded = json.loads(params_file.read_text(encoding="utf-8")) if params_file.exists() else None
    if read_manifest(directory) is not None or (recorded is not None and recorded != params):
        for pattern in outputs:
            for stale in directory.glob(pattern):
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    (directory / MANIFEST).unlink(missing_ok=True)
    write_json_atomic(params_file, params)


def manifest_digest(manifest: dict[str, Any]) -> str:
    """Fingerprint of an upstream stage's output, recorded downstream so a changed input invalidates the stage."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def ordered_parallel_map(
    func: Callable[[Any], Any],
    items: Iterable[Any],
    workers: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
) -> Iterator[Any]:
    """Like ``Pool.imap`` but with a bounded number of items in flight, so a lazy input (a streamed dump) is never
    read into memory ahead of the workers. ``workers <= 1`` runs in-process (no pickling, easy to debug)."""
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(func, items)
        return
    with multiprocessing.get_context("fork").Pool(workers, initializer=initializer, initargs=initargs) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(func, (item,)))
            if len(pending) >= 3 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
