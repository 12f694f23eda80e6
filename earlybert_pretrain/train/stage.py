"""One training stage on the DeepSpeed engine, the backend both recipes (pre-training, fine-tuning) run on.

A ``Stage`` owns its engine from build to release, as a context manager::

    with Stage.build(model, settings, runtime) as stage:   # seed, optimizer, schedule, engine
        stage.resume(hooks)                                 # the stage's newest complete checkpoint, if any
        result = stage.run(open_batches, steps, hooks)      # forward, backward, accumulate, clip, step, checkpoint
        save_pretrained(stage.module, folder)               # fp32 weights, whatever the training precision
    # the engine is released here (and on any error), so no caller holds a half-torn-down engine

The step is timed by the paper's protocol (Sec. 4.1): forward, backward, clipping and the optimizer step are inside
the timer; the waits for micro-batches are not. A step takes its micro-batches one at a time as it needs them, so the
loader builds the next ones while the current one computes (it keeps a whole step's worth in flight:
``pretrain.batches.prefetched``). The batch source runs outside the training RNG: whatever it draws (a DataLoader
iterator draws its base seed from torch's global generator) cannot shift the dropout masks, so a resumed stage, which
opens its iterators at another step, is the same stage. Hooks (``StageHook``) add a loss term
(the search's L1 penalty), act after each optimizer step (ticket draws, evaluation, early stop) and carry state
through checkpoints, so a resumed stage is the same stage.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import itertools
import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from earlybert_pretrain.config import EngineConfig, OptimizerConfig
from earlybert_pretrain.errors import RunError
from earlybert_pretrain.train.checkpoint import (
    capture_rng_state,
    checkpoint_tag,
    complete_checkpoints,
    load_latest_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from earlybert_pretrain.train.distributed import from_every_rank
from earlybert_pretrain.train.engine import build_engine, deepspeed_config, describe_runtime, loss_scaler
from earlybert_pretrain.train.optim import build_optimizer
from earlybert_pretrain.train.schedules import build_scheduler
from earlybert_pretrain.train.telemetry import StepTimer, TensorBoardLogger
from earlybert_pretrain.train.zero_lamb import optimized_parameter_count, optimizer_state_bytes

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Runtime:
    """Where a run executes: this process's rank, the data-parallel world size, its device and resolved precision."""

    rank: int
    world_size: int
    device: torch.device
    precision: str  # fp32 | bf16 | fp16 (resolved, see engine.resolve_precision)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Schedule:
    """The learning-rate shape over ``total_steps`` optimizer steps; ``kind=None`` holds the lr constant."""

    total_steps: int
    warmup: float = 0.0
    kind: str | None = "warmup_poly"  # warmup_poly (NVIDIA, pre-training) | warmup_linear (fine-tuning) | None
    power: float = 0.5


@dataclass(frozen=True)
class StageSettings:
    """Everything that shapes one stage's training; recipes build it from their configs."""

    name: str  # checkpoint tag prefix, log and TensorBoard prefix
    seed: int  # the stage's own randomness (dropout), so a stage rerun after a restart is the same stage
    global_batch_size: int
    micro_batch_size: int
    optimizer: OptimizerConfig
    lr: float
    schedule: Schedule
    grad_clip: float
    zero_stage: int = 0
    reduce_bucket_size: int = EngineConfig.reduce_bucket_size  # ZeRO 1/2, elements (train/memory.py)
    allgather_bucket_size: int = EngineConfig.allgather_bucket_size
    compile: bool = False
    checkpoint_dir: Path | None = None  # None: this stage keeps no checkpoints
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    allow_world_size_change: bool = False  # resume checkpoints written by another number of ranks (ZeRO 0)


class StageHook:
    """Override what a hook needs; the defaults do nothing."""

    def extra_loss(self, module: nn.Module) -> torch.Tensor | None:
        """A term added to the model's loss on every micro-batch (e.g. the L1 penalty on slimming coefficients)."""
        return None

    def after_step(self, stage: Stage, step: int) -> bool:
        """Called after optimizer step ``step`` (1-based); True stops the stage there."""
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class StageResult:
    """What a finished stage reports; saved as JSON in the run's progress file."""

    name: str
    steps: int
    planned_steps: int
    stopped_early: bool
    losses: list[float]  # per optimizer step: mean over micro-batches of model loss + hook terms
    parameters: int
    optimizer_parameters: int  # what the engine's optimizer holds: equals ``parameters`` for a re-initialised model
    parameter_digests_by_rank: list[str]
    timing: dict = field(default_factory=dict)  # StepTimer.summary() + the runtime description

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> StageResult:
        return cls(**{key: values[key] for key in cls.__dataclass_fields__})


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter's bytes: equal on all data-parallel ranks, or the replicas diverged."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _outside_training_rng() -> Iterator[None]:
    """Run the batch source with the global RNGs (Python, NumPy, torch CPU) put back afterwards: a DataLoader draws its
    base seed from torch's generator when an iterator is built, which a resumed run does at another step; batches are
    pure functions of their index and draw from their own generators."""
    python, numpy, torch_cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(torch_cpu)


def _free_memory() -> None:
    """Collect released engines (DeepSpeed's hooks make reference cycles) before the next one is built."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _loss_terms(output: object) -> dict[str, torch.Tensor]:
    """The model's named loss terms besides ``loss`` (pre-training: mlm_loss, nsp_loss), for the logs."""
    return {name: value for name, value in vars(output).items()
            if name.endswith("_loss") and isinstance(value, torch.Tensor)}


class Stage:
    """A built engine for one stage; use ``Stage.build(...)`` as a context manager."""

    def __init__(self, engine, settings: StageSettings, runtime: Runtime, kernel: str,
                 tensorboard: TensorBoardLogger | None):
        self.engine, self.settings, self.runtime = engine, settings, runtime
        self.tensorboard = tensorboard or TensorBoardLogger("", enabled=False)
        self.description = describe_runtime(engine, kernel)
        self.timer = StepTimer(runtime.device)
        self.step, self.losses = 0, []
        self._hooks: Sequence[StageHook] = ()
        logger.info("%s: %s", settings.name, json.dumps(self.description))

    @classmethod
    def build(cls, model: nn.Module, settings: StageSettings, runtime: Runtime,
              tensorboard: TensorBoardLogger | None = None) -> Stage:
        _free_memory()
        seed_everything(settings.seed)
        model.to(runtime.device)  # before the optimizer: the fused-kernel choice looks at where the parameters live
        optimizer, kernel = build_optimizer(model, settings.optimizer, settings.lr, settings.zero_stage)
        schedule = settings.schedule
        scheduler = None if schedule.kind is None else build_scheduler(
            optimizer, schedule.total_steps, schedule.warmup, schedule.power, schedule=schedule.kind)
        if settings.compile:
            model.bert_model().encoder.compile()
        engine = build_engine(model, optimizer, scheduler, deepspeed_config(
            settings.global_batch_size, settings.micro_batch_size, runtime.world_size, runtime.precision,
            settings.grad_clip, settings.zero_stage, settings.optimizer.name, settings.reduce_bucket_size,
            settings.allgather_bucket_size))
        return cls(engine, settings, runtime, kernel, tensorboard)

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def release(self) -> None:
        """Tear the engine down before the next one; the process group stays (DeepSpeed keeps a handle to it)."""
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None
            _free_memory()

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    @property
    def accumulation_steps(self) -> int:
        return self.engine.gradient_accumulation_steps()

    def full_precision_copies(self, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
        """fp32 CPU copies of ``params`` as the optimizer holds them (gathered under any ZeRO sharding).

        The parameters are the optimizer's fp32 values in every precision mode (bf16/fp16 are autocast over fp32
        parameters, engine.py); a half-precision parameter would be a rounded copy of a master kept elsewhere.
        """
        import deepspeed  # the stage is the one place that knows DeepSpeed's gather API

        rounded = sorted({str(param.dtype) for param in params if param.dtype != torch.float32})
        if rounded:
            raise RuntimeError(f"{self.settings.name}: the module holds {', '.join(rounded)} parameters, rounded "
                               "copies of the optimizer's fp32 masters; the engine must run autocast over fp32")
        with deepspeed.zero.GatheredParameters(list(params)):
            return [param.detach().float().cpu().clone() for param in params]

    def check_ranks_agree(self, tensor: torch.Tensor, what: str) -> None:
        """Raise when the data-parallel ranks hold different values of ``tensor``: the replicas diverged."""
        if self.runtime.world_size == 1:
            return
        import torch.distributed as dist

        local = tensor.to(self.runtime.device)
        everyone = [torch.empty_like(local) for _ in range(self.runtime.world_size)]
        dist.all_gather(everyone, local)
        if any(not torch.equal(other, local) for other in everyone):
            raise RuntimeError(f"{self.settings.name}: data-parallel ranks disagree on {what}; the replicas diverged")

    def resume(self, hooks: Sequence[StageHook] = ()) -> bool:
        """Load the stage's newest complete checkpoint (engine, timer, RNG, hooks); False when there is none."""
        if self.settings.checkpoint_dir is None:
            return False
        client = load_latest_checkpoint(self.engine, self.settings.checkpoint_dir, self.settings.name,
                                        self.settings.allow_world_size_change)
        if client is None:
            return False
        self.step, self.losses = client["step"], client["losses"]
        self.timer.load_state_dict(client["timer"])
        restore_rng_state(client["rng"])
        for hook, state in zip(hooks, client["hooks"]):
            hook.load_state_dict(state)
        scaler = loss_scaler(self.engine)
        if scaler is not None and client.get("loss_scaler"):  # fp16: resume with the scale the run had reached
            scaler.load_state_dict(client["loss_scaler"])
        return True

    def save_handoff(self, stage: str, geometry: dict) -> None:
        """Checkpoint the engine as it ends (fp32 masters, optimizer moments) for the next stage to continue from."""
        save_checkpoint(self.engine, self.settings.checkpoint_dir, checkpoint_tag(stage, self.step),
                        {"stage": stage, "geometry": geometry}, self.settings.keep_checkpoints,
                        about={"geometry": geometry})

    def load_handoff(self, stage: str, geometry: dict, with_optimizer: bool = True) -> None:
        """Start from the hand-off ``stage`` left: its weights and, with ``with_optimizer``, its optimizer state
        (LAMB moments); this stage's own lr schedule restarts from its first step (NVIDIA's phase 2)."""
        # Checked on the marker first: DeepSpeed would fail on the first mismatched shape, deep in its loader.
        saved = [marker.get("about", {}).get("geometry") for marker in
                 complete_checkpoints(self.settings.checkpoint_dir, stage)]
        if saved and saved[-1] is not None and saved[-1] != geometry:
            raise RunError(self._geometry_mismatch(stage, saved[-1], geometry))
        client = load_latest_checkpoint(
            self.engine, self.settings.checkpoint_dir, stage, self.settings.allow_world_size_change,
            load_optimizer_states=with_optimizer,
            load_lr_scheduler_states=False, load_module_only=not with_optimizer)
        if client is None:
            raise RunError(f"{self.settings.checkpoint_dir}: no complete '{stage}' checkpoint to continue from; "
                           "the previous stage did not finish here (pass --overwrite to start over)")
        if client["geometry"] != geometry:
            raise RunError(self._geometry_mismatch(stage, client["geometry"], geometry))
        scheduler = self.engine.lr_scheduler
        if scheduler is not None:  # the loaded param groups carry the previous stage's last lr
            for group, lr in zip(self.engine.optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr

    def _geometry_mismatch(self, stage: str, saved: dict, geometry: dict) -> str:
        return (f"{self.settings.checkpoint_dir}: the '{stage}' checkpoint holds a model of geometry {saved}, this "
                f"run builds {geometry}; pass --overwrite to start over")

    def run(self, open_batches: Callable[[int], Iterator[Batch]], steps: int,
            hooks: Sequence[StageHook] = ()) -> StageResult:
        """Train until ``steps`` optimizer steps are done or a hook stops the stage.

        ``open_batches(n)`` yields this rank's micro-batches from its ``n``-th on (n = steps done x accumulation), so
        a resumed stage reads exactly the batches it would have read.
        """
        self._hooks = hooks
        settings, accumulation = self.settings, self.accumulation_steps
        if self.step:
            logger.info("%s: resumed at step %d of %d", settings.name, self.step, steps)
        with _outside_training_rng():
            batches = open_batches(self.step * accumulation)
        stopped_early = False
        while self.step < steps and not stopped_early:
            lr = self.engine.get_lr()[0]  # the lr this step uses (the scheduler moves on inside it)
            means = self.train_step(itertools.islice(batches, accumulation), hooks)
            if "sdpa_backends" not in self.description:
                self._describe_attention()
            self.step += 1
            if getattr(self.engine.optimizer, "overflow", False):  # fp16: the step counts, its update did not happen
                logger.warning("%s step %d: inf/nan gradients (fp16 overflow): update skipped, lr schedule held, "
                               "loss scale now %g", settings.name, self.step, loss_scaler(self.engine).get_scale())
            self.losses.append(means["loss"])
            stopped_early = any([hook.after_step(self, self.step) for hook in hooks])
            self._log(steps, {**means, "lr": lr})
            if (settings.checkpoint_dir is not None and self.step % settings.checkpoint_every == 0
                    and self.step < steps and not stopped_early):
                self._save_checkpoint()
        if stopped_early:
            logger.info("%s: stopped by a hook at step %d of %d", settings.name, self.step, steps)
        digests = from_every_rank(parameter_digest(self.module))
        if len(set(digests)) != 1:
            raise RuntimeError(f"{settings.name}: data-parallel ranks hold different parameters (digests {digests})")
        optimizer_parameters = optimized_parameter_count(self.engine)
        state_bytes = optimizer_state_bytes(self.engine)  # this rank's share: ZeRO 1/2 divide it by the world size
        logger.info("%s: optimizer state per rank %s", settings.name, json.dumps(state_bytes))
        return StageResult(settings.name, self.step, steps, stopped_early, list(self.losses),
                           sum(p.numel() for p in self.module.parameters()), optimizer_parameters, digests,
                           {**self.timer.summary(), "runtime": self.description, "optimizer_state_bytes": state_bytes})

    def train_step(self, micro_batches: Iterable[Batch], hooks: Sequence[StageHook] = ()) -> dict[str, float]:
        """One optimizer step over ``micro_batches`` (one step's worth), timed; returns the mean loss terms and the
        gradient norm. Each micro-batch is fetched and moved to the device when the step reaches it, the wait for it
        timed as data wait; nothing waits on the device before the step's end."""
        device, source = self.runtime.device, iter(micro_batches)
        terms: list[dict[str, torch.Tensor]] = []
        tokens: list[torch.Tensor] = []
        grad_norm: torch.Tensor | float | None = None
        with self.timer.step():  # data fetching stays outside the timed step (Sec. 4.1)
            while True:
                with self.timer.data_wait(), _outside_training_rng():
                    batch = next(source, None)
                    if batch is None:
                        break
                    tokens.append(batch["attention_mask"].sum())  # on the host for loader batches: no sync
                    batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
                output = self.engine(**batch)
                extra = [term for hook in hooks if (term := hook.extra_loss(self.engine.module)) is not None]
                loss = output.loss + sum(extra) if extra else output.loss
                self.engine.backward(loss)
                if self.settings.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
                    grad_norm = self._gradient_norm()  # before the step clips and clears the gradients
                self.engine.step()
                values = {"loss": loss, **_loss_terms(output)}
                if extra:
                    values["l1"] = sum(extra)
                terms.append({name: value.detach().float() for name, value in values.items()})
        self.timer.count_tokens(int(torch.stack(tokens).sum()) * self.runtime.world_size)
        if grad_norm is None:  # ZeRO 1/2: the optimizer computed it over its partitions
            grad_norm = self.engine.get_global_grad_norm()
        means = {name: torch.stack([t[name] for t in terms]).mean().item() for name in terms[0]}
        return {**means, "grad_norm": None if grad_norm is None else float(grad_norm)}

    def _gradient_norm(self) -> torch.Tensor:
        """The global L2 norm of the gradients the optimizer is about to use: averaged over micro-batches and ranks
        (DeepSpeed has reduced them by now), before clipping, without the fp16 loss scale. DeepSpeed computes it only
        under ZeRO 1/2 (``get_global_grad_norm`` is None at ZeRO 0). A device tensor: read once the step is done."""
        grads = [param.grad for param in self.module.parameters() if param.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        scaler = loss_scaler(self.engine)
        return norm if scaler is None else norm / scaler.get_scale()

    def _describe_attention(self) -> None:
        """The SDPA kernels the first step ran, not the ones enabled: our models record what SDPA dispatched to."""
        kernels = getattr(self.module, "attention_kernels", None)
        self.description["sdpa_backends"] = kernels() if callable(kernels) else ["unknown"]
        logger.info("%s: attention kernels of the first step: %s", self.settings.name,
                    ", ".join(self.description["sdpa_backends"]))

    def _save_checkpoint(self) -> None:
        client = {"stage": self.settings.name, "step": self.step, "losses": self.losses,
                  "timer": self.timer.state_dict(), "rng": capture_rng_state(),
                  "hooks": [hook.state_dict() for hook in self._hooks]}
        scaler = loss_scaler(self.engine)  # DeepSpeed's checkpoint does not hold the autocast GradScaler (fp16)
        if scaler is not None:
            client["loss_scaler"] = scaler.state_dict()
        save_checkpoint(self.engine, self.settings.checkpoint_dir, checkpoint_tag(self.settings.name, self.step),
                        client, self.settings.keep_checkpoints)

    def _log(self, steps: int, values: dict[str, float]) -> None:
        timer, name = self.timer, self.settings.name
        values = {**values,
                  "loss_scale": scaler.get_scale() if (scaler := loss_scaler(self.engine)) is not None else None,
                  "sequences_per_second": self.engine.train_batch_size() / timer.last_seconds,
                  "tokens_per_second": timer.tokens / timer.total_seconds, "step_seconds": timer.last_seconds,
                  "step_wall_seconds": timer.last_wall_seconds, "data_wait_seconds": timer.last_data_wait_seconds}
        self.tensorboard.scalars(values, self.step, prefix=f"{name}/")
        if self.runtime.is_main and (self.step % self.settings.log_every == 0 or self.step == steps):
            eta = timer.mean_step_seconds * (steps - self.step)
            terms = "".join(f"  {key.removesuffix('_loss')} {values[key]:.4f}" for key in values
                            if key.endswith("_loss") or key == "l1")
            logger.info("%s step %d/%d  loss %.4f%s  lr %.3g  %.1f seq/s  ETA %dm%02ds", name, self.step, steps,
                        values["loss"], terms, values["lr"], values["sequences_per_second"], eta // 60, eta % 60)
