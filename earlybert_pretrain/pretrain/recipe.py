"""EarlyBERT pre-training: search -> draw -> re-initialise -> phase 1 -> phase 2 (paper Sec. 3.2, 4.1, 4.3).

    python -m earlybert_pretrain.pretrain --config configs/pretrain_bert_base.yaml [key=value ...]
        [--resume] [--overwrite] [--compare-to DENSE_RUN_DIR]

Modes: ``earlybert`` (all stages), ``dense`` (plain BERT, 100% of the steps), ``random`` (a random ticket, same counts
as a drawn one), ``ticket`` (train ``ticket: path``; no search). Every stage resumes from its last complete
checkpoint; finished stages leave files (``theta0/``, ``ticket.json``, ``phase1_model/``) the next stage starts from.

Output folder: ``run.json`` (the config), ``progress.json`` (finished stages), ``timing.json`` (per-stage step time
without data I/O, Sec. 4.1's protocol), ``checkpoints/``, ``tensorboard/``, ``search/`` (mask history, Figure-1
heatmap), ``ticket.json`` + ``ticket_report.json``, ``final_model/`` (HF format + vocab.txt + ticket.json) and
``report.json`` / ``report.txt``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from earlybert_pretrain.common.files import atomic_write_json
from earlybert_pretrain.config import PhaseConfig, PretrainConfig, config_to_dict
from earlybert_pretrain.model.bert import BertConfig, BertForPreTraining
from earlybert_pretrain.model.hf import copy_tokenizer_files, load_pretrained, save_pretrained
from earlybert_pretrain.pretrain.batches import PretrainingBatches, ShardedCorpus, check_vocab
from earlybert_pretrain.pretrain.report import STAGES
from earlybert_pretrain.tickets.distance import EarlyBirdDetector
from earlybert_pretrain.tickets.draw import draw_ticket, gather_coefficients, l1_penalty, random_ticket
from earlybert_pretrain.tickets.history import MaskHistory
from earlybert_pretrain.tickets.prune import prune
from earlybert_pretrain.tickets.report import render_report, ticket_report
from earlybert_pretrain.tickets.ticket import Ticket
from earlybert_pretrain.train.checkpoint import (
    capture_rng_state,
    checkpoint_tag,
    load_latest_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from earlybert_pretrain.train.distributed import barrier, from_every_rank
from earlybert_pretrain.train.engine import EngineConfigError, build_engine, deepspeed_config, describe_runtime
from earlybert_pretrain.train.optim import build_optimizer
from earlybert_pretrain.train.schedules import build_scheduler
from earlybert_pretrain.train.telemetry import StepTimer, TensorBoardLogger

logger = logging.getLogger(__name__)

MODES = ("earlybert", "dense", "random", "ticket")
# Share of the total steps run at seq 128 (Sec. 4.1: 9/10; NVIDIA's recipe: 7,038 of 8,601).
PRESETS = {"paper": 0.9, "nvidia": 7038 / 8601}


class RunError(ValueError):
    """A run the user must fix (output folder, mode, lengths); the message says what and how."""


@dataclass
class Run:
    cfg: PretrainConfig
    out: Path
    rank: int
    world_size: int
    device: torch.device
    precision: str
    tensorboard: TensorBoardLogger
    progress: dict
    corpus: ShardedCorpus

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def finish_stage(self, stage: str, result: dict) -> None:
        """Record a finished stage (rank 0 writes, every rank waits): the resume point for later runs."""
        self.progress[stage] = result
        if self.is_main:
            atomic_write_json(self.out / "progress.json", self.progress)
            atomic_write_json(self.out / "timing.json", {name: entry.get("timing", {})
                                                          for name, entry in self.progress.items()})
        barrier()


def parameter_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter's bytes: equal on all data-parallel ranks, or the replicas diverged."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def phase_steps(cfg: PretrainConfig, dense: bool) -> dict[str, int]:
    """Steps per phase: the preset's split of total_steps, times pruned_step_fraction for a pruned model (Sec. 4.3)."""
    phase1 = round(cfg.total_steps * PRESETS[cfg.preset])
    default = {"phase1": phase1, "phase2": cfg.total_steps - phase1}
    fraction = 1.0 if dense else cfg.pruned_step_fraction
    return {name: max(1, round(fraction * steps)) for name, steps in default.items()}


def validate(cfg: PretrainConfig, world_size: int) -> None:
    """Every setting checked before anything is trained; one clear error naming the field."""
    choices = {"mode": (cfg.mode, MODES), "preset": (cfg.preset, tuple(PRESETS)),
               "reinit": (cfg.reinit, ("rewind", "random")), "search.stop": (cfg.search.stop, ("fixed", "early-bird"))}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise RunError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}")
    if cfg.mode == "ticket" and not cfg.ticket:
        raise RunError("mode=ticket needs ticket=path/to/ticket.json")
    if not 0.0 < cfg.pruned_step_fraction <= 1.0 or cfg.total_steps < 2 or cfg.search.steps < 1:
        raise RunError("pruned_step_fraction must be in (0, 1], total_steps >= 2 and search.steps >= 1")
    for name in ("phase1", "phase2"):
        phase: PhaseConfig = getattr(cfg, name)
        if phase.seq_len > cfg.model.max_position_embeddings:
            raise RunError(f"{name}.seq_len={phase.seq_len} exceeds model.max_position_embeddings="
                           f"{cfg.model.max_position_embeddings}")
        try:
            deepspeed_config(phase.global_batch_size, phase.micro_batch_size, world_size, "fp32",
                             cfg.optimizer.grad_clip, cfg.engine.zero_stage, cfg.optimizer.name)
        except EngineConfigError as err:
            raise RunError(f"{name}: {err}") from None
    check_vocab(cfg.data.shard_dir, cfg.model.vocab_size)


def flatten(values: dict, prefix: str = "") -> dict:
    """{"phase1": {"lr": 1}} -> {"phase1.lr": 1}, to name the keys two configs differ in."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def prepare_output(cfg: PretrainConfig, out: Path, resume: bool, overwrite: bool, is_main: bool) -> dict:
    """Refuse a folder holding another run unless --resume (same config) or --overwrite; returns the progress."""
    run_file, config = out / "run.json", config_to_dict(cfg)
    holds_run, holds_files = run_file.is_file(), out.is_dir() and any(out.iterdir())
    barrier()  # every rank has looked before rank 0 may delete anything
    if overwrite and holds_files:
        if is_main:
            shutil.rmtree(out)
    elif holds_run and resume:
        previous = flatten(json.loads(run_file.read_text())["config"])
        current = flatten(config)
        changed = sorted(key for key in set(previous) | set(current) if previous.get(key) != current.get(key))
        if changed:
            raise RunError(f"{out} holds a run with a different config ({', '.join(changed)} differ); resume it "
                           f"with its own config or pass --overwrite to start over")
    elif holds_run:
        raise RunError(f"{out} holds another run; pass --resume to continue it or --overwrite to replace it")
    elif holds_files:
        raise RunError(f"{out} holds files that are not a pre-training run; pass --overwrite to replace them")
    if is_main:
        atomic_write_json(run_file, {"config": config, "argv": sys.argv})
    barrier()
    progress_file = out / "progress.json"
    return json.loads(progress_file.read_text()) if progress_file.is_file() else {}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def initial_model(cfg: PretrainConfig, slimming: bool) -> BertForPreTraining:
    """θ0: the seeded initialisation (slimming coefficients start at 1 and draw no random numbers)."""
    torch.manual_seed(cfg.seed)
    return BertForPreTraining(BertConfig.from_dict({**cfg.model.to_dict(), "slimming": slimming}))


class SearchMonitor:
    """Search-stage bookkeeping: the L1 term, a ticket every ``record_every`` steps, the early-bird detector."""

    def __init__(self, run: Run):
        self.run, self.search = run, run.cfg.search
        self.history = MaskHistory()
        self.detector = EarlyBirdDetector(self.search.early_bird_window, self.search.early_bird_eps)

    def penalty(self, model: BertForPreTraining) -> torch.Tensor:
        return l1_penalty(model, self.search.lam, self.search.lam_ffn)

    def draw(self, engine, step: int) -> Ticket:
        """Gather the coefficients (under any ZeRO sharding), check every rank holds the same, draw a ticket."""
        import deepspeed

        params = [c for _, _, c in engine.module.slimming_coefficients()]
        with deepspeed.zero.GatheredParameters(params):
            coefficients = gather_coefficients(engine.module)
        flat = torch.cat(coefficients["head"] + coefficients["ffn"]).to(self.run.device)
        if self.run.world_size > 1:
            everyone = [torch.empty_like(flat) for _ in range(self.run.world_size)]
            dist.all_gather(everyone, flat)
            if any(not torch.equal(other, flat) for other in everyone):
                raise RuntimeError("data-parallel ranks disagree on the slimming coefficients; the replicas diverged")
        return draw_ticket(coefficients, self.search.heads_to_prune, self.search.ffn_ratio, self.search.ffn_scope,
                           config=engine.module.config, step=step, lam_heads=self.search.lam,
                           lam_ffn=self.search.lam_ffn, ffn_multiple_of=self.search.ffn_multiple_of)

    def record(self, engine, step: int) -> bool:
        """Record a ticket at ``step``; True when the search should stop here (early-bird mode, detector fired)."""
        ticket = self.draw(engine, step)
        self.history.add(step, ticket)
        converged = self.detector.update(ticket)
        if self.detector.distances:
            self.run.tensorboard.scalars(self.detector.distances[-1], step, prefix="search/mask_distance_")
        for kind, layer, coefficients in engine.module.slimming_coefficients():
            self.run.tensorboard.histogram(f"search/{kind}_coefficients/layer{layer}", coefficients, step)
        return converged and self.search.stop == "early-bird"

    def state_dict(self) -> dict:
        return self.history.to_dict()

    def load_state_dict(self, state: dict) -> None:
        self.history = MaskHistory.from_dict(state)
        for ticket in self.history.tickets:  # replay: the detector's state is a function of the recorded masks
            self.detector.update(ticket)


def train_stage(run: Run, stage: str, model: BertForPreTraining, phase: PhaseConfig, schedule_steps: int,
                steps: int, monitor: SearchMonitor | None = None):
    """Train ``steps`` optimizer steps (fewer if the search stops early) and return (engine, result)."""
    cfg = run.cfg
    free_memory()
    # Each stage's randomness (dropout) starts from its own seed, so a stage run after a restart is the same run.
    seed_everything(cfg.seed + STAGES.index(stage))
    model.to(run.device)  # before the optimizer: the fused-kernel choice looks at where the parameters live
    optimizer, kernel = build_optimizer(model, cfg.optimizer, phase.lr)
    scheduler = build_scheduler(optimizer, schedule_steps, phase.warmup, cfg.optimizer.decay_power)
    if cfg.engine.compile:
        model.bert.encoder.compile()
    engine = build_engine(model, optimizer, scheduler, deepspeed_config(
        phase.global_batch_size, phase.micro_batch_size, run.world_size, run.precision, cfg.optimizer.grad_clip,
        cfg.engine.zero_stage, cfg.optimizer.name))
    runtime = describe_runtime(engine, kernel)
    logger.info("%s: %s", stage, json.dumps(runtime))
    timer, step, losses, samples, stopped_early = StepTimer(run.device), 0, [], 0, False
    client = load_latest_checkpoint(engine, run.out / "checkpoints", stage)
    if client is not None:
        step, losses, samples = client["step"], client["losses"], client["samples_consumed"]
        timer.load_state_dict(client["timer"])
        restore_rng_state(client["rng"])
        if monitor is not None:
            monitor.load_state_dict(client["search"])
        logger.info("%s: resumed at step %d of %d", stage, step, steps)
    data = cfg.data
    stream = PretrainingBatches(
        run.corpus, phase.seq_len, phase.max_predictions, phase.micro_batch_size, run.rank, run.world_size,
        seed=data.seed, masked_lm_prob=data.masked_lm_prob, short_seq_prob=data.short_seq_prob,
        whole_word_masking=data.whole_word_masking, start_sample=samples)
    batches = iter(stream)
    first_samples = from_every_rank(stream.batch_indices(samples))
    accumulation, tokens_per_step = engine.gradient_accumulation_steps(), phase.global_batch_size * phase.seq_len
    while step < steps and not stopped_early:
        micro_batches = [{k: v.to(run.device) for k, v in next(batches).items()} for _ in range(accumulation)]
        terms, lr = [], engine.get_lr()[0]  # the lr this step uses (the scheduler moves on inside it)
        with timer.step(tokens=tokens_per_step):  # data fetching above stays outside the timed step (Sec. 4.1)
            for batch in micro_batches:
                output = engine(**batch)
                l1 = monitor.penalty(engine.module) if monitor is not None else torch.zeros((), device=run.device)
                engine.backward(output.loss + l1)
                engine.step()
                terms.append(torch.stack([output.loss + l1, output.mlm_loss, output.nsp_loss, l1]).detach().float())
        step += 1
        loss, mlm, nsp, l1_value = (torch.stack(terms).mean(0)).tolist()
        losses.append(loss)
        if monitor is not None and (step % cfg.search.record_every == 0 or step == steps):
            stopped_early = monitor.record(engine, step)
        log_step(run, stage, engine, step, steps, timer, {"loss": loss, "mlm_loss": mlm, "nsp_loss": nsp, "lr": lr,
                                                          "l1": l1_value if monitor is not None else None})
        if step % cfg.engine.checkpoint_every == 0 and step < steps and not stopped_early:
            ticket_file = run.out / "ticket.json"
            client = {"stage": stage, "step": step, "losses": losses, "samples_consumed": stream.samples_consumed,
                      "ticket": str(ticket_file) if ticket_file.is_file() else None,
                      "timer": timer.state_dict(), "rng": capture_rng_state(),
                      "search": monitor.state_dict() if monitor is not None else None}
            save_checkpoint(engine, run.out / "checkpoints", checkpoint_tag(stage, step), client,
                            cfg.engine.keep_checkpoints)
    if stopped_early:
        logger.info("%s: early-bird ticket found at step %d; search stopped", stage, step)
    digests = from_every_rank(parameter_digest(engine.module))
    if len(set(digests)) != 1:
        raise RuntimeError(f"{stage}: data-parallel ranks hold different parameters (digests {digests})")
    result = {"steps": step, "planned_steps": steps, "stopped_early": stopped_early, "losses": losses,
              "samples": stream.samples_consumed, "first_samples_by_rank": first_samples,
              "parameter_digests_by_rank": digests, "timing": {**timer.summary(), "runtime": runtime}}
    return engine, result


def log_step(run: Run, stage: str, engine, step: int, steps: int, timer: StepTimer, losses: dict) -> None:
    sequences = engine.train_batch_size()
    values = {**losses, "grad_norm": engine.get_global_grad_norm(),
              "loss_scale": engine.optimizer.loss_scale if engine.fp16_enabled() else None,
              "sequences_per_second": sequences / timer.last_seconds,
              "tokens_per_second": timer.tokens / timer.total_seconds}
    run.tensorboard.scalars(values, step, prefix=f"{stage}/")
    if run.is_main and (step % run.cfg.engine.log_every == 0 or step == steps):
        eta = timer.mean_step_seconds * (steps - step)
        logger.info("%s step %d/%d  loss %.4f  mlm %.4f  nsp %.4f  lr %.3g  %.1f seq/s  ETA %dm%02ds", stage, step,
                    steps, losses["loss"], losses["mlm_loss"], losses["nsp_loss"], values["lr"],
                    values["sequences_per_second"], eta // 60, eta % 60)


def release(engine) -> None:
    """Tear an engine down before the next one; the process group stays (DeepSpeed keeps a handle to it)."""
    engine.destroy()


def free_memory() -> None:
    """Collect released engines (DeepSpeed's hooks make reference cycles) before the next one is built."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_search(run: Run, dense_steps: dict[str, int]) -> Ticket:
    """Search (phase-1 settings, loss + λ‖c‖₁) and draw: the ticket every rank agrees on, saved as ticket.json."""
    cfg, out = run.cfg, run.out
    if "draw" in run.progress:
        return Ticket.load(out / "ticket.json")
    model = initial_model(cfg, slimming=True)
    if run.is_main and not (out / "theta0").is_dir():
        save_pretrained(model, out / "theta0")  # θ0, before any step: re-initialisation rewinds to it
    barrier()
    monitor = SearchMonitor(run)
    search_steps = min(cfg.search.steps, dense_steps["phase1"])
    engine, result = train_stage(run, "search", model, cfg.phase1, dense_steps["phase1"], search_steps, monitor)
    started = time.perf_counter()
    ticket = monitor.history.tickets[-1]  # drawn at the search's last step from the coefficients every rank holds
    payload = [ticket.to_dict() if run.is_main else None]
    if run.world_size > 1:
        dist.broadcast_object_list(payload, src=0)
    broadcast = Ticket.from_dict(payload[0], where="ticket broadcast from rank 0")
    digests = from_every_rank(ticket.digest())
    if set(digests) != {broadcast.digest()}:
        raise RuntimeError(f"ranks drew different tickets (digests {digests}); rank 0 drew {broadcast.digest()}")
    if run.is_main:
        broadcast.save(out / "ticket.json")
    draw_seconds = time.perf_counter() - started
    if run.is_main:
        report = ticket_report(broadcast, cfg.model)
        logger.info("ticket drawn at search step %d\n%s", result["steps"], render_report(report))
        monitor.history.save(out / "search" / "mask_history.json")
        monitor.history.save_heatmap(out / "search" / "heatmap.png")
        run.tensorboard.image("search/mask_distance_heatmap", monitor.history.heatmap_image(), result["steps"])
        atomic_write_json(out / "ticket_report.json", report)
    release(engine)
    result["early_bird_update"] = monitor.detector.fired_at_update
    run.finish_stage("search", result)
    run.finish_stage("draw", {"digest": broadcast.digest(), "digests_by_rank": digests,
                              "timing": {"total_seconds": draw_seconds}})
    return broadcast


def phase1_model(run: Run, ticket: Ticket | None) -> BertForPreTraining:
    """The model phase 1 trains: dense θ0, or the ticket applied to θ0 (rewind) or a fresh random init."""
    cfg = run.cfg
    if ticket is None:
        return initial_model(cfg, slimming=False)
    theta0_folder = run.out / "theta0"
    theta0 = (load_pretrained(BertForPreTraining, theta0_folder) if theta0_folder.is_dir()
              else initial_model(cfg, slimming=False))
    pruned = prune(theta0, ticket)
    if cfg.reinit == "random":
        torch.manual_seed(cfg.seed + 1)
        pruned = BertForPreTraining(pruned.config)
    return pruned


def obtain_ticket(run: Run, dense_steps: dict[str, int]) -> Ticket | None:
    cfg = run.cfg
    if cfg.mode == "dense":
        return None
    if cfg.mode == "earlybert":
        return run_search(run, dense_steps)
    if cfg.mode == "random":
        ticket = random_ticket(cfg.model, cfg.search.heads_to_prune, cfg.search.ffn_ratio, cfg.search.ffn_scope,
                               seed=cfg.seed, ffn_multiple_of=cfg.search.ffn_multiple_of)
    else:
        ticket = Ticket.load(cfg.ticket)
        ticket.check_fits(cfg.model)
    if run.is_main:
        ticket.save(run.out / "ticket.json")
        atomic_write_json(run.out / "ticket_report.json", ticket_report(ticket, cfg.model))
    barrier()
    return ticket


def train_phases(run: Run, ticket: Ticket | None) -> None:
    cfg, out, steps = run.cfg, run.out, phase_steps(run.cfg, dense=ticket is None)
    for name, phase in (("phase1", cfg.phase1), ("phase2", cfg.phase2)):
        if name in run.progress:
            continue
        started = time.perf_counter()
        model = phase1_model(run, ticket) if name == "phase1" else load_pretrained(BertForPreTraining,
            out / "phase1_model")
        build_seconds = time.perf_counter() - started
        logger.info("%s: %s parameters, %d steps", name, f"{model.num_parameters():,}", steps[name])
        engine, result = train_stage(run, name, model, phase, steps[name], steps[name])
        result["timing"]["model_build_seconds"] = build_seconds  # the re-init cost for a pruned phase 1
        result["parameters"] = model.num_parameters()
        if run.is_main:
            folder = out / ("phase1_model" if name == "phase1" else "final_model")
            save_pretrained(engine.module, folder)
            if name == "phase2":
                copy_tokenizer_files(run.corpus.vocab_path.parent, folder)
                if ticket is not None:
                    shutil.copy2(out / "ticket.json", folder / "ticket.json")
        release(engine)
        del engine, model
        run.finish_stage(name, result)
