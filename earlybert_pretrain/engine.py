"""The DeepSpeed engine: precision, its config, building it, what runs where, and crash-safe checkpoints.

The model and the optimizer know nothing of DeepSpeed; this module wraps them. A second, smaller engine can be built
later in the same process (re-initialisation with the pruned model): the process group is never destroyed, because
DeepSpeed keeps a handle to it (../shared/FACTS.md).

Checkpoint layout under ``ckpt_dir``: one folder per tag (``phase1-step000120``) written by DeepSpeed, then a
``complete.json`` marker (file sizes, stage, step, a save sequence number) written once every rank has finished, then
the ``latest`` file (DeepSpeed's name and format: the tag). A tag without its marker is a crashed save and is ignored.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .atomic import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPLETE_MARKER = "complete.json"
LATEST_FILE = "latest"
CLIENT_STATE_KEY = "earlybert_client_state"  # our client state sits under one key, clear of DeepSpeed's own keys
TAG_PATTERN = re.compile(r"^(?P<stage>[A-Za-z0-9_]+)-step(?P<step>\d+)$")


class EngineConfigError(ValueError):
    """An engine setting the user can fix; the message names the config field."""


def resolve_precision(requested: str, device: torch.device) -> str:
    """fp32 | bf16 | fp16 for ``device``. ``auto``: bf16 on CUDA GPUs with bf16 (Ampere, Hopper), fp16 with dynamic loss
    scaling on older ones (V100 has no bf16), fp32 on the CPU (bf16 is emulated, hence slower, on CPUs without AMX)."""
    if requested not in PRECISIONS:
        raise EngineConfigError(f"engine.precision: expected one of {', '.join(PRECISIONS)}, got {requested!r}")
    on_cuda = torch.device(device).type == "cuda"
    if requested == "auto":
        if not on_cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp16" and not on_cuda:
        raise EngineConfigError("engine.precision=fp16: DeepSpeed's CPU accelerator does not support fp16; "
                                "use engine.precision=bf16 (or fp32) on the CPU")
    if requested == "bf16" and on_cuda and not torch.cuda.is_bf16_supported():
        raise EngineConfigError("engine.precision=bf16: this GPU has no bf16 (e.g. V100); use engine.precision=fp16")
    return requested


def deepspeed_config(global_batch_size: int, micro_batch_size: int, world_size: int, precision: str,
                     grad_clip: float, zero_stage: int, optimizer_name: str) -> dict:
    """The DeepSpeed JSON config for one phase; gradient accumulation = global / (micro * world size)."""
    if global_batch_size < 1 or micro_batch_size < 1 or world_size < 1:
        raise EngineConfigError(f"batch sizes and world size must be >= 1, got global_batch_size={global_batch_size}, "
                                f"micro_batch_size={micro_batch_size}, world_size={world_size}")
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        raise EngineConfigError(
            f"the global batch ({global_batch_size}, phase*.global_batch_size) is not divisible by micro-batch "
            f"({micro_batch_size}, phase*.micro_batch_size) x world size ({world_size}) = {per_step}; "
            f"pick a global batch that is a multiple of {per_step}")
    if precision not in PRECISIONS[1:]:
        raise EngineConfigError(f"engine.precision: expected fp32, bf16 or fp16 here (resolve 'auto' first with "
                                f"resolve_precision), got {precision!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise EngineConfigError(f"engine.zero_stage: expected 0..3, got {zero_stage}")
    if optimizer_name == "lamb" and zero_stage >= 1:
        raise EngineConfigError(
            f"engine.zero_stage={zero_stage} with LAMB: ZeRO >= 1 hands the optimizer flattened partitions, so LAMB's "
            "trust ratio would be computed per partition instead of per tensor (measured 6.7e-2 off the reference "
            "after 5 steps; ../shared/FACTS.md). Use engine.zero_stage=0 (BERT-large fits a 16 GB V100 without ZeRO) "
            "or optimizer.name=adamw")
    if grad_clip < 0:
        raise EngineConfigError(f"optimizer.grad_clip must be >= 0 (0 = off), got {grad_clip}")
    return {
        "train_batch_size": global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": global_batch_size // per_step,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,  # our client optimizers (AdamW) under ZeRO; LAMB is refused above
        # loss_scale 0 = dynamic loss scaling, starting at 2^16 and halving on overflow (skipped step).
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10**9,  # our own log lines; DeepSpeed's would interleave with them
        "wall_clock_breakdown": False,
    }


def init_distributed() -> tuple[int, int, torch.device]:
    """Join (or, for a lone process without a launcher, create) the process group; returns (rank, world, device).

    A lone ``python -m ...`` gets the environment DeepSpeed would otherwise look for in mpi4py. On the CPU, DeepSpeed's
    shared-memory all-reduce op (inference only) would be JIT-compiled on first use (~60 s): it is switched off.
    """
    import deepspeed

    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                           ("MASTER_PORT", str(port))):
            os.environ.setdefault(key, value)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        device = torch.device("cpu")
    if not (dist.is_available() and dist.is_initialized()):
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None, ds_config: dict):
    """``deepspeed.initialize`` with our optimizer and scheduler; the process group is created once and then reused."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return engine


def _layer_norm_kernel(model: nn.Module) -> str:
    names = {type(module).__name__ for module in model.modules() if "LayerNorm" in type(module).__name__}
    if "FusedLayerNorm" in names:
        return "apex-fused-layer-norm"
    return "torch-native-layer-norm" if names else "none"


def _attention_backends(device: torch.device) -> list[str]:
    """SDPA backends enabled and available here; on CUDA a padding mask rules flash out, so mem-efficient runs."""
    if device.type != "cuda":
        return ["cpu-flash", "math"]  # PyTorch's CPU flash kernel where the inputs allow, math otherwise
    backends = []
    major, _ = torch.cuda.get_device_capability(device)
    if torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.is_flash_attention_available() and major >= 8:
        backends.append("flash")
    if torch.backends.cuda.mem_efficient_sdp_enabled():
        backends.append("mem-efficient")
    if torch.backends.cuda.math_sdp_enabled():
        backends.append("math")
    return backends


def _compiled(engine) -> bool:
    """DeepSpeed's engine.compile(), or nn.Module.compile() on any submodule (the encoder, with engine.compile)."""
    return bool(engine.is_compiled) or any(getattr(m, "_compiled_call_impl", None) is not None
                                           for m in engine.module.modules())


def describe_runtime(engine, optimizer_kernel: str) -> dict:
    """Which kernels and which precision are active, for the run log (issue 5 item 4)."""
    device = next(engine.module.parameters()).device
    precision = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": precision,
        "dynamic_loss_scaling": bool(engine.fp16_enabled() and engine.dynamic_loss_scale()),
        "optimizer_kernel": optimizer_kernel,
        "layer_norm_kernel": _layer_norm_kernel(engine.module),
        "attention": "sdpa",
        "sdpa_backends": _attention_backends(device),
        "zero_stage": engine.zero_optimization_stage(),
        "world_size": engine.world_size,
        "micro_batch_size": engine.train_micro_batch_size_per_gpu(),
        "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
        "global_batch_size": engine.train_batch_size(),
        "gradient_clipping": engine.gradient_clipping(),
        "torch_compile": _compiled(engine),
    }


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


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _file_sizes(tag_dir: Path) -> dict[str, int]:
    return {str(path.relative_to(tag_dir)): path.stat().st_size
            for path in sorted(tag_dir.rglob("*")) if path.is_file() and path.name != COMPLETE_MARKER}


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


def save_checkpoint(engine, ckpt_dir: str | os.PathLike, tag: str, client_state: dict, keep: int) -> Path:
    """Save the engine (module, optimizer, scheduler, steps) and ``client_state`` under ``tag``; every rank calls it.

    The tag counts only once the marker is written (after all ranks finished and the files are fsynced); ``latest``
    moves to it after that; older tags of the same stage beyond ``keep`` are then removed. Assumes ``ckpt_dir`` is on
    a file system all ranks share.
    """
    match = TAG_PATTERN.match(tag)
    if not match:
        raise ValueError(f"checkpoint tag {tag!r}: expected '<stage>-step<number>', see checkpoint_tag()")
    if keep < 1:
        raise ValueError(f"engine.keep_checkpoints must be >= 1, got {keep}")
    ckpt_dir = Path(ckpt_dir)
    tag_dir = ckpt_dir / tag
    if _rank() == 0 and tag_dir.exists():  # a crashed save of the same tag: start clean
        shutil.rmtree(tag_dir)
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={CLIENT_STATE_KEY: client_state},
                           save_latest=False)
    barrier()
    if _rank() == 0:
        for path in tag_dir.rglob("*"):
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        previous = complete_checkpoints(ckpt_dir)
        sequence = previous[-1]["sequence"] + 1 if previous else 1
        atomic_write_json(tag_dir / COMPLETE_MARKER, {
            "tag": tag, "stage": match["stage"], "step": int(match["step"]), "sequence": sequence,
            "files": _file_sizes(tag_dir)})
        atomic_write_text(ckpt_dir / LATEST_FILE, tag)
        _prune_stage(ckpt_dir, match["stage"], keep, tag)
    barrier()
    return tag_dir


def _check_files(tag_dir: Path, marker: dict) -> str | None:
    """None when every file the marker lists is there with its size, else what is wrong."""
    for name, size in marker["files"].items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, expected {size}"
    return None


def load_latest_checkpoint(engine, ckpt_dir: str | os.PathLike, stage: str | None = None) -> dict | None:
    """Load the newest complete checkpoint (of ``stage``, when given) into ``engine``; return its client state.

    The tag named by ``latest`` comes first; when its files are missing, truncated or fail to load, the previous
    complete tag is tried, with a warning that says so. None when there is no checkpoint to try; an error when every
    one was tried and failed while loading, as the engine may then hold part of one.
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
                load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
            except Exception as err:  # torch.load / DeepSpeed raise many types on a damaged file
                problem = f"loading failed ({type(err).__name__}: {err})"
                failed_loads.append(tag)
            else:
                if load_path is None:
                    problem = "DeepSpeed found no checkpoint files"
                elif CLIENT_STATE_KEY not in client_state:
                    problem = "no client state (not saved by earlybert_pretrain.engine.save_checkpoint)"
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

