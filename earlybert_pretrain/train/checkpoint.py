"""Crash-safe checkpoints of a DeepSpeed engine, with the RNG state that makes a resumed run the same run.

Layout under ``ckpt_dir``: one folder per tag (``phase1-step000120``) written by DeepSpeed, then a ``complete.json``
marker (each file's size and sha256, stage, step, a save sequence number) written once every rank has finished, then
the ``latest`` file (DeepSpeed's name and format: the tag). A tag without its marker is a crashed save and is ignored;
a tag whose files no longer match their marker (missing, truncated, flipped bytes) is skipped for the previous one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import secrets
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from earlybert_pretrain.common.files import atomic_write_json, atomic_write_text, sha256_file
from earlybert_pretrain.errors import ConfigError, RunError
from earlybert_pretrain.train.distributed import barrier, from_every_rank, rank, world_size

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "complete.json"
LATEST_FILE = "latest"
CLIENT_STATE_KEY = "earlybert_client_state"  # our client state sits under one key, clear of DeepSpeed's own keys
TAG_PATTERN = re.compile(r"^(?P<stage>[A-Za-z0-9_]+)-step(?P<step>\d+)$")


def capture_rng_state() -> dict:
    """Python, NumPy, torch CPU and (when present) every CUDA device's RNG state."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_tag(stage: str, step: int) -> str:
    """``phase1``, 120 -> ``phase1-step000120`` (sorts by step within a stage)."""
    tag = f"{stage}-step{step:06d}"
    if not TAG_PATTERN.match(tag):
        raise ValueError(f"checkpoint stage {stage!r}: expected letters, digits or underscores")
    return tag


def _tag_files(tag_dir: Path) -> list[Path]:
    return [path for path in sorted(tag_dir.rglob("*")) if path.is_file() and path.name != COMPLETE_MARKER]


def _fsync_and_hash(path: Path) -> str:
    """Flush ``path`` to disk and return its sha256 (the bytes are still in the page cache: no second disk read)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
    return sha256_file(path)


def _read_marker(tag_dir: Path) -> dict | None:
    try:
        return json.loads((tag_dir / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None


def complete_checkpoints(ckpt_dir: str | os.PathLike, stage: str | None = None) -> list[dict]:
    """Markers of the complete checkpoints (optionally of one stage), oldest save first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    markers = []
    for tag_dir in ckpt_dir.iterdir():
        marker = _read_marker(tag_dir) if tag_dir.is_dir() else None
        if marker is not None and (stage is None or marker["stage"] == stage):
            markers.append(marker)
    return sorted(markers, key=lambda marker: marker["sequence"])


def _prune_stage(ckpt_dir: Path, stage: str, keep: int, current_tag: str) -> None:
    """Remove this stage's tags beyond the newest ``keep`` complete ones, and crashed (unmarked) saves of it."""
    complete = [marker["tag"] for marker in complete_checkpoints(ckpt_dir, stage)]
    doomed = set(complete[:-keep])
    for tag_dir in ckpt_dir.iterdir():
        match = TAG_PATTERN.match(tag_dir.name)
        if (match and match["stage"] == stage and tag_dir.name != current_tag and tag_dir.is_dir()
                and (tag_dir.name in doomed or _read_marker(tag_dir) is None)):
            shutil.rmtree(tag_dir, ignore_errors=True)


def save_checkpoint(engine, ckpt_dir: str | os.PathLike, tag: str, client_state: dict, keep: int,
                    about: dict | None = None) -> Path:
    """Save the engine (module, optimizer, scheduler, steps) and ``client_state`` under ``tag``; every rank calls it.
    ``about`` (JSON) goes into the marker, readable before anything is loaded into an engine.

    The tag counts only once the marker is written (after all ranks finished and the files are fsynced); ``latest``
    moves to it after that; older tags of the same stage beyond ``keep`` are then removed. Assumes ``ckpt_dir`` is on
    a file system all ranks share.
    """
    match = TAG_PATTERN.match(tag)
    if not match:
        raise ValueError(f"checkpoint tag {tag!r}: expected '<stage>-step<number>', see checkpoint_tag()")
    if keep < 1:
        raise ConfigError(f"engine.keep_checkpoints must be >= 1, got {keep}")
    ckpt_dir = Path(ckpt_dir)
    tag_dir = ckpt_dir / tag
    if rank() == 0 and tag_dir.exists():  # a crashed save of the same tag: start clean
        shutil.rmtree(tag_dir)
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={CLIENT_STATE_KEY: client_state},
                           save_latest=False)
    barrier()
    if rank() == 0:
        files = _tag_files(tag_dir)
        sha256 = {str(path.relative_to(tag_dir)): _fsync_and_hash(path) for path in files}
        previous = complete_checkpoints(ckpt_dir)
        sequence = previous[-1]["sequence"] + 1 if previous else 1
        atomic_write_json(tag_dir / COMPLETE_MARKER, {
            "tag": tag, "stage": match["stage"], "step": int(match["step"]), "sequence": sequence,
            "files": {str(path.relative_to(tag_dir)): path.stat().st_size for path in files}, "sha256": sha256,
            "about": about or {}})
        atomic_write_text(ckpt_dir / LATEST_FILE, tag)
        _prune_stage(ckpt_dir, match["stage"], keep, tag)
    barrier()
    return tag_dir


def _local_problem(tag_dir: Path, marker: dict) -> str | None:
    """This rank's verdict: every listed file there with its size, and this rank's share of them with its sha256."""
    checksums = marker.get("sha256") or {}
    if set(checksums) != set(marker["files"]):
        return f"{COMPLETE_MARKER} lacks the sha256 of some files (written by an older version)"
    for name, size in marker["files"].items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, expected {size}"
    for name in sorted(checksums)[rank()::world_size()]:
        if sha256_file(tag_dir / name) != checksums[name]:
            return f"{name} does not match its sha256 in {COMPLETE_MARKER} (its bytes changed after the save)"
    return None


def _check_files(tag_dir: Path, marker: dict) -> str | None:
    """None when every file the marker lists is there with its size and sha256, else what is wrong.

    The hashing is split over the ranks (rank r hashes every world_size-th file) and the verdicts are shared, so
    each byte is read once per load and every rank reaches the same verdict.
    """
    return next((verdict for verdict in from_every_rank(_local_problem(tag_dir, marker)) if verdict), None)


def load_latest_checkpoint(engine, ckpt_dir: str | os.PathLike, stage: str | None = None,
                           **load_options: bool) -> dict | None:
    """Load the newest complete checkpoint (of ``stage``, when given) into ``engine``; return its client state.
    ``load_options`` go to DeepSpeed's ``load_checkpoint`` (e.g. ``load_lr_scheduler_states=False``).

    The tag named by ``latest`` comes first; when its files are missing, truncated, changed (sha256) or fail to load,
    the previous complete tag is tried, with a warning that names the tag and the file. None when there is no
    checkpoint to try; an error when every one was tried and failed while loading, as the engine may then hold part
    of one.
    """
    ckpt_dir = Path(ckpt_dir)
    candidates = complete_checkpoints(ckpt_dir, stage)
    latest_path = ckpt_dir / LATEST_FILE
    latest = latest_path.read_text().strip() if latest_path.is_file() else None
    candidates.sort(key=lambda marker: (marker["tag"] == latest, marker["sequence"]), reverse=True)
    failed_loads = []
    for index, marker in enumerate(candidates):
        tag = marker["tag"]
        problem = _check_files(ckpt_dir / tag, marker)
        if problem is None:
            try:
                load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, **load_options)
            except Exception as err:  # torch.load / DeepSpeed raise many types on a damaged file
                problem = f"loading failed ({type(err).__name__}: {err})"
                failed_loads.append(tag)
            else:
                if load_path is None:
                    problem = "DeepSpeed found no checkpoint files"
                elif CLIENT_STATE_KEY not in client_state:
                    problem = "no client state (not saved by earlybert_pretrain.train.engine.save_checkpoint)"
        if problem is None:
            if index:
                logger.warning("resumed from checkpoint %s in %s (the newer ones were unusable)", tag, ckpt_dir)
            return client_state[CLIENT_STATE_KEY]
        following = candidates[index + 1]["tag"] if index + 1 < len(candidates) else None
        fallback = f"falling back to the previous complete checkpoint {following}" if following else "no other left"
        logger.warning("checkpoint %s in %s is corrupt: %s; %s", tag, ckpt_dir, problem, fallback)
    if failed_loads:
        raise RuntimeError(f"no usable checkpoint in {ckpt_dir}: {', '.join(failed_loads)} failed while loading, so "
                           "the engine may hold part of one; build a fresh engine, or remove the damaged tags")
    return None



def check_shared(ckpt_dir: Path) -> None:
    """Checkpoints must be on a file system every rank shares: rank 0 writes a probe file, every rank looks for it.

    Raises RunError on every rank, naming the folder and the ranks that cannot see the probe.
    """
    if world_size() == 1:
        return
    token = secrets.token_hex(8) if rank() == 0 else None
    box = [token]
    dist.broadcast_object_list(box, src=0)
    probe = ckpt_dir / f".shared-probe-{box[0]}"
    if rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(probe, box[0])
    barrier()
    sees = from_every_rank(probe.is_file() and probe.read_text() == box[0])
    barrier()
    if rank() == 0:
        probe.unlink(missing_ok=True)
    blind = [index for index, seen in enumerate(sees) if not seen]
    if blind:
        raise RunError(f"{ckpt_dir}: rank(s) {blind} do not see the file rank 0 just wrote there; checkpoints must be "
                       f"on a file system every rank shares: set output_dir to a shared path (e.g. NFS, Lustre)")
