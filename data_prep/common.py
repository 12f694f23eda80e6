"""Helpers shared by the stages: the error type, stage manifests, worker pools.

Atomic writes, temp-file sweeping and hashing are ``earlybert_pretrain.common.files`` (the one implementation); every
temp name there starts with ``TEMP_MARK``, so ``begin_stage`` sweeps what a killed run left.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from earlybert_pretrain.common.files import atomic_write_json, read_json, remove_entry, remove_stale_temps
from earlybert_pretrain.errors import UserError

MANIFEST = "manifest.json"


class PrepError(UserError):
    """An error the user can cause (bad input file, corrupt dump, wrong vocab); the message names the file."""


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / MANIFEST
    return read_json(path, "stage manifest", PrepError) if path.exists() else None


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
    remove_stale_temps(directory)
    params_file = directory / "params.json"
    recorded = read_json(params_file, "stage parameters", PrepError) if params_file.exists() else None
    if read_manifest(directory) is not None or (recorded is not None and recorded != params):
        for pattern in outputs:
            for stale in directory.glob(pattern):
                remove_entry(stale)  # a linked folder: the link, never what it points to
    (directory / MANIFEST).unlink(missing_ok=True)
    atomic_write_json(params_file, params)


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
