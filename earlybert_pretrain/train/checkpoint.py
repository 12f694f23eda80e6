"""Crash-safe checkpoints of a DeepSpeed engine, with the RNG state that makes a resumed run the same run.

Layout under ``ckpt_dir``: one folder per tag (``phase1-step000120``) written by DeepSpeed, then a ``complete.json``
marker (each file's size and sha256, stage, step, a save sequence number) written once every rank has finished, then
the ``latest`` file (DeepSpeed's name and format: the tag). A tag without its marker is a crashed save and is ignored;
a tag whose files no longer match their marker (missing, truncated, flipped bytes) is skipped for the previous one.

Checkpoints are read with ``torch.load(weights_only=True)`` and the few DeepSpeed classes they hold (``SafeFiles``):
a file that would run code on loading is refused, not executed. A full disk while saving removes the half-written tag
and names the last complete one, which stays. The marker records the world size: a checkpoint resumes on as many ranks
as wrote it; on another number only when the caller accepts the change (``--allow-world-size-change``) and the
optimizer state is whole in every checkpoint (ZeRO 0: DeepSpeed cannot re-partition ZeRO 1/2 state). Each step then
trains on the same global samples (pre-training's samples are a function of the step and the global batch), from the
same weights and optimizer state; the dropout streams of the ranks and the summation order are new.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import secrets
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from earlybert_pretrain.common.files import atomic_write_json, atomic_write_text, sha256_file
from earlybert_pretrain.common.oserrors import USER_ERRNOS, FileSystemError
from earlybert_pretrain.common.run_folder import ALLOW_WORLD_SIZE_CHANGE
from earlybert_pretrain.errors import ConfigError, RunError, UserError
from earlybert_pretrain.train.distributed import barrier, from_every_rank, rank, world_size

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "complete.json"
LATEST_FILE = "latest"
CLIENT_STATE_KEY = "earlybert_client_state"  # our client state sits under one key, clear of DeepSpeed's own keys
TAG_PATTERN = re.compile(r"^(?P<stage>[A-Za-z0-9_]+)-step(?P<step>\d+)$")


def _local_rng_state() -> dict:
    """This process's generators in types ``torch.load(weights_only=True)`` reads (NumPy's key as a list)."""
    name, key, position, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, key.tolist(), position, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this rank's own device, the one its dropout draws from
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def capture_rng_state() -> dict:
    """Every rank's Python, NumPy, torch CPU and CUDA-device RNG state, gathered on every rank (a collective): only
    rank 0 writes the client state, and each rank must get its own generators back, not rank 0's."""
    return {"by_rank": from_every_rank(_local_rng_state())}


def restore_rng_state(state: dict) -> None:
    """Put back this rank's own generators, as ``capture_rng_state`` took them. After an accepted change of world
    size (``load_latest_checkpoint``), a rank the saved run did not have gets generators seeded from rank 0's saved
    state and its own rank: a new stream, the same on every rerun."""
    by_rank = state["by_rank"]
    if rank() < len(by_rank):
        _set_rng_state(by_rank[rank()])
    else:
        _seed_rng(by_rank[0], rank())


def _set_rng_state(local: dict) -> None:
    random.setstate(local["python"])
    name, key, position, has_gauss, gauss = local["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(local["torch"])
    if "cuda" in local and torch.cuda.is_available():
        torch.cuda.set_rng_state(local["cuda"])


def _seed_rng(base: dict, new_rank: int) -> None:
    digest = hashlib.sha256(base["torch"].numpy().tobytes() + new_rank.to_bytes(4, "little")).digest()
    seed = int.from_bytes(digest[:8], "little") >> 1  # torch.manual_seed takes a non-negative int64
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # the CUDA generators too


def _deepspeed_globals() -> list:
    """The classes DeepSpeed pickles into its checkpoints (ZeRO's stage enum and fragment addresses, the loss
    scalers, ours under fp16 ZeRO 1/2): plain records, reconstructed without calling any code of the file's choosing."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from earlybert_pretrain.train.engine import ZeroDynamicLossScale  # fp16 under ZeRO 1/2: ours, pickled by ZeRO

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler, ZeroDynamicLossScale]


class SafeFiles:
    """DeepSpeed's torch checkpoint engine with safe loading and reported write failures.

    ``load`` reads with ``weights_only=True`` (DeepSpeed's own engine passes False, so a crafted pickle would run
    code); ``save`` writes through a Python file, so a full disk raises ``OSError(ENOSPC)`` instead of torch's
    "unexpected pos" / "basic_ios::clear", and records the first failure instead of raising it inside DeepSpeed's
    save, so every rank still reaches DeepSpeed's closing barrier and the ranks agree on the outcome afterwards.
    """

    def __init__(self, inner) -> None:
        self.inner, self.failure = inner, None

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def save(self, state_dict, path: str) -> None:
        if self.failure is not None:  # the save already failed on this rank: write nothing more
            return
        try:
            with open(path, "wb") as handle:
                torch.save(state_dict, handle, _use_new_zipfile_serialization=self.inner.zipfile_serialization)
        except OSError as err:
            self.failure = err

    def load(self, path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(_deepspeed_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"GLOBAL (\S+)", str(err))
            what = found[1] if found else str(err).splitlines()[0]
            raise RunError(f"{path}: refused to load: it holds {what}, which a checkpoint of this program never "
                           "holds and which could run code on loading; remove that checkpoint folder") from None


def _safe_files(engine) -> SafeFiles:
    """The engine's checkpoint engine, wrapped once in ``SafeFiles``."""
    if not isinstance(engine.checkpoint_engine, SafeFiles):
        if type(engine.checkpoint_engine).__name__ != "TorchCheckpointEngine":
            raise RuntimeError(f"checkpoints expect DeepSpeed's TorchCheckpointEngine, the engine has "
                               f"{type(engine.checkpoint_engine).__name__}")
        engine.checkpoint_engine = SafeFiles(engine.checkpoint_engine)
    return engine.checkpoint_engine


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
    files = _safe_files(engine)
    files.failure = None
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={CLIENT_STATE_KEY: client_state},
                           save_latest=False)
    # Every rank learns every rank's outcome (the gathers also keep the ranks in step): files, then marker.
    failure = next((failure for failure in from_every_rank(files.failure) if failure is not None), None)
    if failure is None and rank() == 0:
        try:
            _complete(ckpt_dir, tag_dir, match, keep, about)
        except OSError as err:
            failure = err
    failure = next((failure for failure in from_every_rank(failure) if failure is not None), None)
    if failure is not None:
        _abandon(ckpt_dir, tag_dir, failure)
    return tag_dir


def _complete(ckpt_dir: Path, tag_dir: Path, match: re.Match, keep: int, about: dict | None) -> None:
    """Rank 0, once every rank's files are written: the marker (sizes, sha256, world size), ``latest``, pruning."""
    files = _tag_files(tag_dir)
    sha256 = {str(path.relative_to(tag_dir)): _fsync_and_hash(path) for path in files}
    previous = complete_checkpoints(ckpt_dir)
    sequence = previous[-1]["sequence"] + 1 if previous else 1
    atomic_write_json(tag_dir / COMPLETE_MARKER, {
        "tag": tag_dir.name, "stage": match["stage"], "step": int(match["step"]), "sequence": sequence,
        "files": {str(path.relative_to(tag_dir)): path.stat().st_size for path in files}, "sha256": sha256,
        "world_size": world_size(), "about": about or {}})
    atomic_write_text(ckpt_dir / LATEST_FILE, tag_dir.name)
    _prune_stage(ckpt_dir, match["stage"], keep, tag_dir.name)


def _abandon(ckpt_dir: Path, tag_dir: Path, failure: OSError) -> None:
    """A save that failed on some rank: rank 0 removes the half-written tag (the earlier ones stay), every rank
    raises. A full disk, a quota or a permission is the user's to fix: one line naming the tag and what is kept."""
    if rank() == 0:
        shutil.rmtree(tag_dir, ignore_errors=True)
    barrier()
    kept = [marker["tag"] for marker in complete_checkpoints(ckpt_dir)]
    message = (f"{tag_dir}: {failure.strerror or failure} while saving this checkpoint; removed it, the last complete "
               f"checkpoint {kept[-1] if kept else '(none)'} is kept: free space and resume with --resume")
    if failure.errno in USER_ERRNOS:
        raise FileSystemError(message)
    raise RuntimeError(message) from failure


def _local_problem(tag_dir: Path, marker: dict) -> str | None:
    """This rank's verdict: every listed file there with its size, and this rank's share of them with its sha256."""
    checksums = marker.get("sha256") or {}
    if set(checksums) != set(marker["files"]):
        return f"{COMPLETE_MARKER} lacks the sha256 of some files (written by an older version)"
    if "world_size" not in marker:  # and its RNG state is rank 0's alone, in NumPy arrays a safe load refuses
        return f"{COMPLETE_MARKER} lacks the world size (written by an older version)"
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
                           allow_world_size_change: bool = False, **load_options: bool) -> dict | None:
    """Load the newest complete checkpoint (of ``stage``, when given) into ``engine``; return its client state.
    ``load_options`` go to DeepSpeed's ``load_checkpoint`` (e.g. ``load_lr_scheduler_states=False``).

    The tag named by ``latest`` comes first; when its files are missing, truncated, changed (sha256) or fail to load,
    the previous complete tag is tried, with a warning that names the tag and the file. None when there is no
    checkpoint to try; an error when every one was tried and failed while loading, as the engine may then hold part
    of one. Refused at once (RunError): a file that would run code; checkpoints written by another world size unless
    ``allow_world_size_change`` (the recipes' ``--allow-world-size-change``) and the engine's optimizer state is
    whole (ZeRO 0).
    """
    ckpt_dir = Path(ckpt_dir)
    _check_world_size(ckpt_dir, engine, allow_world_size_change)
    _safe_files(engine)
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
            except UserError:  # a file that would run code on loading: refused, not skipped
                raise
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


def _check_world_size(ckpt_dir: Path, engine, allowed: bool) -> None:
    """Refuse a run's checkpoints on another world size unless ``allowed`` and the optimizer state is whole (ZeRO 0).
    The newest checkpoint of any stage decides, so a stage that starts fresh after a restart cannot switch either."""
    saved = next((marker["world_size"] for marker in reversed(complete_checkpoints(ckpt_dir))
                  if "world_size" in marker), None)
    now = world_size()
    if saved is None or saved == now:
        return
    found = f"{ckpt_dir}: the run's checkpoints were saved by {saved} rank(s), this run has {now}"
    zero_stage = engine.zero_optimization_stage()
    if zero_stage in (1, 2):  # no flag can help
        raise RunError(f"{found}: under ZeRO {zero_stage} each rank saved its own partition of the optimizer state, "
                       f"which DeepSpeed cannot re-partition over {now}; resume it on {saved} rank(s), or pass "
                       "--overwrite to start over")
    if not allowed:
        raise RunError(f"{found}; resume it on {saved} rank(s) (the dropout streams and optimizer partitions each "
                       f"rank continues are its own), pass {ALLOW_WORLD_SIZE_CHANGE} to continue on {now} (the same "
                       "samples per step; new per-rank random streams), or pass --overwrite to start over")
    logger.warning("%s: continuing on %d rank(s) as asked: the same samples per step from the same weights and "
                   "optimizer state; the ranks' dropout streams and the summation order are new", found, now)


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
