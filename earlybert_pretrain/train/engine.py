"""The DeepSpeed engine: precision, its config, joining the process group, building it, what runs where.

Precision: bf16 and fp16 run as autocast over fp32 parameters (DeepSpeed's ``torch_autocast`` section), so gradients
accumulate in the parameters' fp32 ``.grad`` and the slimming coefficients a ticket is drawn from stay fp32; fp16
adds dynamic loss scaling (DeepSpeed's ZeRO-0 ``torch.amp.GradScaler``; under ZeRO 1/2 the ZeRO optimizer's own
fp16 machinery with ``ZeroDynamicLossScale``). DeepSpeed's own ``bf16`` / ``fp16`` sections
are off: at ZeRO 0 they make the parameters and ``.grad`` half precision, so micro-batches accumulate in bf16/fp16
(measured in benchmarks/accumulation.py), and ``grad_accum_dtype=fp32`` is refused there.

The model and the optimizer know nothing of DeepSpeed; this module wraps them. A second, smaller engine can be built
later in the same process (re-initialisation with the pruned model): the process group is not destroyed in between,
because DeepSpeed keeps a handle to it (../shared/FACTS.md); it ends with the recipe call that created it
(``distributed.leaving_process_group``).
Checkpoints are in ``checkpoint.py``.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import typing

import torch
import torch.distributed as dist
from torch import nn

from earlybert_pretrain.config import EngineConfig, Precision
from earlybert_pretrain.errors import ConfigError
from earlybert_pretrain.train.zero_lamb import make_lamb_exact_under_zero

logger = logging.getLogger(__name__)

PRECISIONS = typing.get_args(Precision)


def _has_bf16_units(device: torch.device) -> bool:
    """bf16 in hardware: compute capability >= 8.0 (Ampere, Hopper). Not ``torch.cuda.is_bf16_supported()``: by
    default it counts emulation and says yes on a V100 (sm_70), where bf16 runs emulated and slow."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(requested: str, device: torch.device) -> str:
    """fp32 | bf16 | fp16 for ``device``. ``auto``: bf16 on CUDA GPUs with bf16 units (compute capability >= 8.0:
    Ampere, Hopper), fp16 with dynamic loss scaling on older ones (V100), fp32 on the CPU (bf16 is emulated, hence
    slower, on CPUs without AMX)."""
    if requested not in PRECISIONS:
        raise ConfigError(f"engine.precision: expected one of {', '.join(PRECISIONS)}, got {requested!r}")
    on_cuda = torch.device(device).type == "cuda"
    if requested == "auto":
        if not on_cuda:
            return "fp32"
        return "bf16" if _has_bf16_units(device) else "fp16"
    if requested == "fp16" and not on_cuda:
        raise ConfigError("engine.precision=fp16: training on the CPU does not support fp16; use engine.precision=bf16 "
                          "(or fp32) there (fp16 with loss scaling is for GPUs without bf16, e.g. V100)")
    if requested == "bf16" and on_cuda and not _has_bf16_units(device):
        raise ConfigError("engine.precision=bf16: this GPU has no bf16 (e.g. V100); use engine.precision=fp16")
    return requested


def evaluation_autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The training precision's autocast for work outside the engine (evaluation): bf16/fp16 matmuls over fp32
    parameters, as in training; nothing for fp32."""
    if precision not in AUTOCAST_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, AUTOCAST_DTYPES[precision]))


def deepspeed_config(global_batch_size: int, micro_batch_size: int, world_size: int, precision: str,
                     grad_clip: float, zero_stage: int, optimizer_name: str,
                     reduce_bucket_size: int = EngineConfig.reduce_bucket_size,
                     allgather_bucket_size: int = EngineConfig.allgather_bucket_size) -> dict:
    """The DeepSpeed JSON config for one phase; gradient accumulation = global / (micro * world size). The ZeRO
    bucket sizes (elements) are always set, never DeepSpeed's defaults (train/memory.py counts them)."""
    if global_batch_size < 1 or micro_batch_size < 1 or world_size < 1:
        raise ConfigError(f"batch sizes and world size must be >= 1, got global_batch_size={global_batch_size}, "
                                f"micro_batch_size={micro_batch_size}, world_size={world_size}")
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        raise ConfigError(
            f"the global batch ({global_batch_size}, phase*.global_batch_size) is not divisible by micro-batch "
            f"({micro_batch_size}, phase*.micro_batch_size) x world size ({world_size}) = {per_step}; "
            f"pick a global batch that is a multiple of {per_step}")
    if precision not in PRECISIONS[1:]:
        raise ValueError(f"deepspeed_config: precision must be fp32, bf16 or fp16 here (resolve 'auto' first with "
                         f"resolve_precision), got {precision!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"engine.zero_stage: expected 0..3, got {zero_stage}")
    if optimizer_name == "lamb" and zero_stage == 3:
        raise ConfigError(
            "engine.zero_stage=3 with LAMB: ZeRO 3 partitions the parameters themselves and gathers them layer by "
            "layer, so the per-tensor trust ratio (train/zero_lamb.py) has no fixed partition map to work on; use "
            "engine.zero_stage=1 or 2 (exact per-tensor LAMB), or optimizer.name=adamw")
    if grad_clip < 0:
        raise ConfigError(f"optimizer.grad_clip must be >= 0 (0 = off), got {grad_clip}")
    if reduce_bucket_size < 1:
        raise ConfigError(f"engine.reduce_bucket_size: expected a number of elements >= 1, got {reduce_bucket_size}")
    if allgather_bucket_size < 2 or allgather_bucket_size % 2:  # DeepSpeed aligns all-gather shards to 2 elements
        raise ConfigError(f"engine.allgather_bucket_size: expected an even number of elements >= 2, got "
                          f"{allgather_bucket_size}")
    return {
        "train_batch_size": global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": global_batch_size // per_step,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage, "reduce_bucket_size": reduce_bucket_size,
                              "allgather_bucket_size": allgather_bucket_size},
        "zero_allow_untested_optimizer": True,  # our client optimizers under ZeRO (LAMB made exact in zero_lamb.py)
        **_precision_sections(precision),
        "steps_per_print": 10**9,  # our own log lines; DeepSpeed's would interleave with them
        "wall_clock_breakdown": False,
    }


AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def _precision_sections(precision: str) -> dict:
    """Autocast over fp32 parameters for bf16 / fp16; DeepSpeed's half-precision parameter modes stay off."""
    autocast = {"enabled": False}
    if precision in AUTOCAST_DTYPES:
        # No module's gradients are tagged for half-precision reduction: under ZeRO 1/2 they are reduced in fp32 too.
        # fp16 gets torch.amp.GradScaler from DeepSpeed: dynamic scaling from 2^16, halved on overflow (step skipped).
        autocast = {"enabled": True, "dtype": AUTOCAST_DTYPES[precision], "lower_precision_safe_modules": []}
    return {"fp16": {"enabled": False}, "bf16": {"enabled": False}, "torch_autocast": autocast}


def init_distributed(collective_timeout_s: float = EngineConfig.collective_timeout_s) -> tuple[int, int, torch.device]:
    """Join (or, for a lone process without a launcher, create) the process group; returns (rank, world, device).

    A lone ``python -m ...`` gets the environment DeepSpeed would otherwise look for in mpi4py. On the CPU, DeepSpeed's
    shared-memory all-reduce op (inference only) would be JIT-compiled on first use (~60 s): it is switched off.
    ``collective_timeout_s`` bounds every collective and the rendezvous of a group created here, so a rank that
    stalls stops the others after that long; a group the caller made keeps its own. Whoever calls this owns the
    group's end: ``distributed.leaving_process_group``.
    """
    import deepspeed

    if collective_timeout_s <= 0:
        raise ConfigError(f"collective_timeout_s: expected seconds > 0, got {collective_timeout_s}")

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
        timeout = datetime.timedelta(seconds=collective_timeout_s)
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout)
        _fresh_deepspeed_groups(timeout)
    return dist.get_rank(), dist.get_world_size(), device


def _fresh_deepspeed_groups(timeout: datetime.timedelta) -> None:
    """DeepSpeed's cached groups for a group just created. Handles left from a group someone destroyed with torch's
    ``destroy_process_group`` (not DeepSpeed's) would make the next engine fail ("Group ... is not registered"); and
    DeepSpeed reduces gradients on a clone of the world group it would make with torch's default timeout (30 min
    for gloo, 10 for NCCL), not ``timeout``: it gets the clone made here."""
    from deepspeed.utils import groups

    release = getattr(groups, "_release_process_group_references", None)  # what deepspeed.comm's destroy calls
    if release is not None:  # DeepSpeed >= 0.19
        release(group=None)
    groups._WORLD_GROUP = dist.new_group(ranks=list(range(dist.get_world_size())), timeout=timeout)


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None, ds_config: dict):
    """``deepspeed.initialize`` with our optimizer and scheduler; the process group is created once and then reused."""
    import deepspeed

    if not ds_config.get("torch_autocast", {}).get("enabled"):
        _forget_earlier_autocast()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    make_lamb_exact_under_zero(engine)  # ZeRO 1/2: per-tensor trust ratios over the flat partitions
    if getattr(engine, "torch_autocast_z0_gradscaler", None) is not None:
        engine.torch_autocast_z0_gradscaler = SkipReportingGradScaler(engine.optimizer, device=engine.device.type)
    if getattr(engine.optimizer, "torch_autocast_gradscaler", None) is not None:
        _scale_inside_zero(engine.optimizer)
    if engine.zero_optimization_stage() in (1, 2):
        _keep_loss_scaler_on_load(engine.optimizer)
    return engine


class SkipReportingGradScaler(torch.amp.GradScaler):
    """fp16 at ZeRO 0: DeepSpeed's autocast GradScaler, which also tells the engine when it skipped a step.

    On inf/nan gradients the scaler skips ``optimizer.step()`` and halves its scale, but DeepSpeed learns of a skipped
    step only through ``optimizer.overflow`` (its fp16 optimizers set it), so the lr schedule would advance over a
    step that never happened. Setting that flag after every update makes DeepSpeed count the step as skipped and hold
    the schedule, as it does for its own fp16 optimizers. (ZeRO 1/2 check for overflow themselves.)
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: str) -> None:
        super().__init__(device=device)
        self.optimizer = optimizer
        optimizer.overflow = False

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        before = self.get_scale()
        super().update(new_scale)
        # The scale only falls (by the backoff factor) when this step found inf/nan and was skipped.
        self.optimizer.overflow = new_scale is None and self.get_scale() < before


class ZeroDynamicLossScale:
    """fp16 under ZeRO 1/2: the dynamic loss scale of DeepSpeed's ZeRO optimizer, by torch's GradScaler rule (2^16 at
    the start, halved on an overflow, doubled after 2,000 steps without one), which the stage logs and checkpoints.

    It speaks DeepSpeed's loss-scaler protocol (``cur_scale``, ``dynamic``, ``scale_loss``, ``update_scale``; the
    ZeRO optimizer pickles it into its checkpoint, so it stays importable here) and GradScaler's (``get_scale``,
    ``state_dict``, ``load_state_dict``) for ``Stage``. The ZeRO step calls ``update_scale`` before it unscales the
    gradients, so a doubling takes effect at the next step's first ``scale_loss``: the step that earned it is
    unscaled by the scale its gradients carry.
    """

    dynamic = True

    def __init__(self, scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.cur_scale, self.growth_interval, self.clean_steps = float(scale), growth_interval, 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        if self.clean_steps == self.growth_interval:
            self.cur_scale, self.clean_steps = self.cur_scale * 2.0, 0
        return loss * self.cur_scale

    def update_scale(self, overflow: bool) -> None:
        if overflow:  # the ZeRO optimizer skips this step (DeepSpeed then holds the lr schedule)
            self.cur_scale, self.clean_steps = self.cur_scale / 2.0, 0
        else:
            self.clean_steps += 1

    def get_scale(self) -> float:
        """The scale the next step's loss is multiplied by."""
        return self.cur_scale * (2.0 if self.clean_steps == self.growth_interval else 1.0)

    def state_dict(self) -> dict:
        return {"scale": self.get_scale(), "clean_steps": self.clean_steps % self.growth_interval}

    def load_state_dict(self, state: dict) -> None:
        self.cur_scale, self.clean_steps = float(state["scale"]), int(state["clean_steps"])


def _scale_inside_zero(zero_optimizer) -> None:
    """fp16 autocast under ZeRO 1/2: loss scaling by the ZeRO optimizer's own fp16 machinery, not the GradScaler
    DeepSpeed hands it. Its step does not fit a GradScaler (deepspeed runtime/zero/stage_1_and_2.py, 0.19.8): it
    clips with its own loss scale (1.0 for fp32 parameters) while the gradients still carry the GradScaler's 2^16, so
    the update shrank ~65,536-fold; on overflow it returns before the GradScaler's update(), so the scale never backed
    off; and it updated the scale once per param group. Its own machinery checks every rank's partition for inf/nan
    (all-reduced), skips the step and backs the scale off, unscales together with clipping and reports the grad norm
    unscaled. DeepSpeed switches that machinery off for fp32 parameters (autocast), hence the settings below."""
    zero_optimizer.torch_autocast_gradscaler = None
    zero_optimizer.loss_scaler = ZeroDynamicLossScale()
    zero_optimizer.dynamic_loss_scale = True
    zero_optimizer.check_grad_overflow = True


def _keep_loss_scaler_on_load(zero_optimizer) -> None:
    """A ZeRO 1/2 checkpoint carries its writer's loss scaler (pickled), and loading it would replace this engine's:
    ``engine.precision=auto`` resolves per machine, so an fp32/bf16 checkpoint resumed in fp16 would train without
    loss scaling. The scaler stays this engine's; ``Stage.resume`` restores an fp16 scale from the client state."""
    load = zero_optimizer.load_state_dict

    def load_state_dict(*args, **kwargs):
        own = zero_optimizer.loss_scaler
        load(*args, **kwargs)
        zero_optimizer.loss_scaler = own

    zero_optimizer.load_state_dict = load_state_dict


def _forget_earlier_autocast() -> None:
    """DeepSpeed records the last autocast engine's dtype in module globals that its ZeRO optimizers read (an fp16
    one adds a GradScaler); an engine without autocast built later in the same process must not inherit them."""
    from deepspeed.runtime import torch_autocast

    torch_autocast.TORCH_AUTOCAST_INITIALIZED, torch_autocast.TORCH_AUTOCAST_DTYPE = False, None


def loss_scaler(engine) -> torch.amp.GradScaler | ZeroDynamicLossScale | None:
    """fp16's dynamic loss scale: the ZeRO-0 GradScaler, or the ZeRO 1/2 optimizer's ``ZeroDynamicLossScale``; None
    otherwise."""
    scale = getattr(engine.optimizer, "loss_scaler", None)
    return getattr(engine, "torch_autocast_z0_gradscaler", None) or (
        scale if isinstance(scale, ZeroDynamicLossScale) else None)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def precision_path(engine) -> str:
    """The precision path as the engine runs it, read from its state: e.g. "bf16 autocast over fp32 parameters,
    fp32 gradient accumulation". At ZeRO 0 micro-batches accumulate in ``.grad``, which has the parameters' dtype."""
    parameters = _dtype_name(next(engine.module.parameters()).dtype)
    if engine.torch_autocast_enabled():
        compute = f"{_dtype_name(engine.torch_autocast_dtype())} autocast over {parameters} parameters"
    else:
        compute = f"{parameters} parameters" + (", fp32 masters in the optimizer" if parameters != "fp32" else "")
    scaling = ", dynamic loss scaling" if loss_scaler(engine) is not None or engine.fp16_enabled() else ""
    return f"{compute}{scaling}, {parameters} gradient accumulation"


def _precision(engine) -> str:
    if engine.torch_autocast_enabled():
        return _dtype_name(engine.torch_autocast_dtype())
    return "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"


def _layer_norm_kernel(model: nn.Module) -> str:
    names = {type(module).__name__ for module in model.modules() if "LayerNorm" in type(module).__name__}
    if any("FusedLayerNorm" in name for name in names):  # Fp32FusedLayerNorm (model/bert.py)
        return "apex-fused-layer-norm"
    return "torch-native-layer-norm" if names else "none"


def _compiled(engine) -> bool:
    """DeepSpeed's engine.compile(), or nn.Module.compile() on any submodule (the encoder, with engine.compile)."""
    return bool(engine.is_compiled) or any(getattr(m, "_compiled_call_impl", None) is not None
                                           for m in engine.module.modules())


def describe_runtime(engine, optimizer_kernel: str) -> dict:
    """Which kernels and which precision are active, for the run log (issue 5 item 4)."""
    device = next(engine.module.parameters()).device
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": _precision(engine),
        "precision_path": precision_path(engine),
        "dynamic_loss_scaling": loss_scaler(engine) is not None or bool(engine.fp16_enabled()
                                                                          and engine.dynamic_loss_scale()),
        "optimizer_kernel": optimizer_kernel,
        "layer_norm_kernel": _layer_norm_kernel(engine.module),
        "attention": "sdpa",  # the kernels it dispatches to are added after the first step (Stage)
        "zero_stage": engine.zero_optimization_stage(),
        "world_size": engine.world_size,
        "micro_batch_size": engine.train_micro_batch_size_per_gpu(),
        "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
        "global_batch_size": engine.train_batch_size(),
        "gradient_clipping": engine.gradient_clipping(),
        "torch_compile": _compiled(engine),
    }
