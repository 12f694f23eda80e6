"""EarlyBERT pre-training: search -> draw -> re-initialise -> phase 1 -> phase 2 (paper Sec. 3.2, 4.1, 4.3).

Modes: ``earlybert`` (all stages), ``dense`` (plain BERT, 100% of the steps), ``random`` (a random ticket, same counts
as a drawn one), ``ticket`` (train ``ticket: path``; no search), ``reduced`` (plain BERT for as many steps as a finished
EarlyBERT run's time or FLOPs; see ``reduced.py``). Every stage runs on the one training backend
(``train.stage.Stage``) and resumes from its last complete checkpoint; finished stages leave the files the next stage
starts from (``theta0/``, ``ticket.json``, ``phase1_model/``; see ``layout.py`` for the whole folder).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from data_prep.indexed import vocab_digest
from earlybert_pretrain.common import run_folder
from earlybert_pretrain.common.files import atomic_write_json, read_json, sha256_file
from earlybert_pretrain.common.lock import hold_run_lock
from earlybert_pretrain.config import PhaseConfig, PretrainConfig, config_to_dict
from earlybert_pretrain.errors import ConfigError, RunError
from earlybert_pretrain.model.bert import BertConfig, BertForPreTraining
from earlybert_pretrain.model.hf import copy_tokenizer_files, save_pretrained
from earlybert_pretrain.pretrain import reduced
from earlybert_pretrain.pretrain.batches import PretrainingBatches, ShardedCorpus, check_vocab, prefetched
from earlybert_pretrain.pretrain.evaluation import Validation, ValidationHook
from earlybert_pretrain.pretrain.layout import RunLayout
from earlybert_pretrain.pretrain.report import STAGES, render_run_report, write_run_report
from earlybert_pretrain.tickets.draw import random_ticket
from earlybert_pretrain.tickets.prune import prune
from earlybert_pretrain.tickets.report import render_report, ticket_report
from earlybert_pretrain.tickets.search import SlimmingSearch
from earlybert_pretrain.tickets.ticket import Ticket
from earlybert_pretrain.train.checkpoint import check_shared
from earlybert_pretrain.train.distributed import (
    agreed,
    agreed_context,
    barrier,
    from_every_rank,
    leaving_process_group,
    on_main_rank,
)
from earlybert_pretrain.train.engine import deepspeed_config, init_distributed, resolve_precision
from earlybert_pretrain.train.stage import Runtime, Schedule, Stage, StageHook, StageSettings
from earlybert_pretrain.train.telemetry import TensorBoardLogger

logger = logging.getLogger(__name__)

# Share of the total steps run at seq 128 (Sec. 4.1: 9/10; NVIDIA's recipe: 7,038 of 8,601).
PRESETS = {"paper": 0.9, "nvidia": 7038 / 8601}


@dataclass
class Run:
    cfg: PretrainConfig
    layout: RunLayout
    runtime: Runtime
    tensorboard: TensorBoardLogger
    progress: dict  # stage name -> its record (StageResult.to_dict() plus stage extras), as in progress.json
    corpus: ShardedCorpus
    validation: Validation | None = None  # None: the shards hold no validation split (said once)
    allow_world_size_change: bool = False  # resume checkpoints written by another number of ranks (ZeRO 0)

    @property
    def is_main(self) -> bool:
        return self.runtime.is_main

    def finish_stage(self, stage: str, record: dict) -> None:
        """Record a finished stage (rank 0 writes, every rank waits): the resume point for later runs."""
        self.progress[stage] = record
        if self.is_main:
            atomic_write_json(self.layout.progress, self.progress)
            atomic_write_json(self.layout.timing, {name: entry.get("timing", {})
                                                   for name, entry in self.progress.items()})
        barrier()


def phase_steps(cfg: PretrainConfig, dense: bool) -> dict[str, int]:
    """Steps per phase: the preset's split of total_steps, times pruned_step_fraction for a pruned model (Sec. 4.3)."""
    default = reduced.split_steps(cfg.total_steps, PRESETS[cfg.preset])
    fraction = 1.0 if dense else cfg.pruned_step_fraction
    return {name: max(1, round(fraction * steps)) for name, steps in default.items()}


def validate(cfg: PretrainConfig, world_size: int) -> None:
    """Every setting that can be checked without training, before the output folder is touched (enumerations and
    types are the config loader's); one clear error naming the field."""
    if cfg.mode == "ticket" and not cfg.ticket:
        raise RunError("mode=ticket needs ticket=path/to/ticket.json")
    if not 0.0 < cfg.pruned_step_fraction <= 1.0 or cfg.total_steps < 2 or (cfg.search.steps or 0) < 1:
        raise RunError("pruned_step_fraction must be in (0, 1], total_steps >= 2 and search.steps >= 1")
    search_room = phase_steps(cfg, dense=True)["phase1"]  # the search runs on phase 1's dense schedule
    if cfg.mode == "earlybert" and cfg.search.steps > search_room:
        raise RunError(f"search.steps={cfg.search.steps} exceeds the {search_room} steps of phase 1 (total_steps="
                       f"{cfg.total_steps}, preset {cfg.preset}) the search runs within; lower search.steps or raise "
                       f"total_steps")
    every = {"engine.checkpoint_every": cfg.engine.checkpoint_every, "engine.log_every": cfg.engine.log_every,
             "engine.keep_checkpoints": cfg.engine.keep_checkpoints, "search.record_every": cfg.search.record_every,
             "data.prefetch": cfg.data.prefetch}
    if cfg.eval.every < 0 or cfg.eval.batches < 1:
        raise RunError(f"eval: expected every >= 0 (0: only at each stage's end) and batches >= 1, got every="
                       f"{cfg.eval.every}, batches={cfg.eval.batches}")
    for name, value in every.items():
        if value < 1:
            raise RunError(f"{name}: expected >= 1, got {value}")
    if cfg.data.num_workers < 0:
        raise RunError(f"data.num_workers: expected >= 0 (0 builds batches in the training process), "
                       f"got {cfg.data.num_workers}")
    if not 0.0 < cfg.data.masked_lm_prob < 1.0:
        raise RunError(f"data.masked_lm_prob: expected a fraction in (0, 1), got {cfg.data.masked_lm_prob}")
    for name in ("phase1", "phase2"):
        phase: PhaseConfig = getattr(cfg, name)
        if phase.seq_len > cfg.model.max_position_embeddings:
            raise RunError(f"{name}.seq_len={phase.seq_len} exceeds model.max_position_embeddings="
                           f"{cfg.model.max_position_embeddings}")
        if not phase.lr > 0.0 or not 0.0 <= phase.warmup < 1.0:
            raise RunError(f"{name}: lr must be > 0 and warmup a fraction in [0, 1), got lr={phase.lr}, "
                           f"warmup={phase.warmup}")
        try:
            deepspeed_config(phase.global_batch_size, phase.micro_batch_size, world_size, "fp32",
                             cfg.optimizer.grad_clip, cfg.engine.zero_stage, cfg.optimizer.name,
                             cfg.engine.reduce_bucket_size, cfg.engine.allgather_bucket_size)
        except ConfigError as err:
            raise RunError(f"{name}: {err}") from None
    check_vocab(cfg.data.shard_dir, cfg.model.vocab_size)
    if cfg.mode == "ticket":
        Ticket.load(cfg.ticket).check_fits(cfg.model)
    else:  # the drawing rules accept these counts (a random draw costs nothing and checks them all)
        random_ticket(cfg.model, cfg.search.heads_to_prune_for(cfg.model), cfg.search.ffn_ratio, cfg.search.ffn_scope,
                      ffn_multiple_of=cfg.search.ffn_multiple_of)


def run_inputs(cfg: PretrainConfig) -> dict[str, str]:
    """Digests of what the run reads besides its config: a resume with changed shards, vocab or ticket is refused."""
    inputs = {"shard_manifest_sha256": sha256_file(Path(cfg.data.shard_dir) / "manifest.json"),
              "vocab_sha256": vocab_digest(cfg.data.shard_dir)}
    if cfg.mode == "ticket":
        inputs["ticket_sha256"] = sha256_file(cfg.ticket)
    return inputs


def prepare_output(cfg: PretrainConfig, layout: RunLayout, resume: bool, overwrite: bool) -> dict:
    """Make the folder this run's (see ``common.run_folder``) on rank 0, check that every rank sees the checkpoint
    folder, and hand every rank the progress of the run being resumed."""

    def prepare() -> dict:
        run_folder.prepare(layout.root, "pre-training", config_to_dict(cfg), run_inputs(cfg), layout.owned(), resume,
                           overwrite, is_main=True)
        return read_json(layout.progress, "progress") if layout.progress.is_file() else {}

    progress = on_main_rank(prepare)
    check_shared(layout.checkpoints)
    return progress


def initial_model(cfg: PretrainConfig, slimming: bool) -> BertForPreTraining:
    """θ0: the seeded initialisation (slimming coefficients start at 1 and draw no random numbers)."""
    torch.manual_seed(cfg.seed)
    return BertForPreTraining(BertConfig.from_dict({**cfg.model.to_dict(), "slimming": slimming}))


def stage_settings(run: Run, stage: str, phase: PhaseConfig, schedule_steps: int) -> StageSettings:
    """A pre-training stage on the backend: LAMB, the phase's batch and lr, NVIDIA's poly-warmup schedule."""
    cfg = run.cfg
    return StageSettings(
        name=stage, seed=cfg.seed + STAGES.index(stage), global_batch_size=phase.global_batch_size,
        micro_batch_size=phase.micro_batch_size, optimizer=cfg.optimizer, lr=phase.lr,
        schedule=Schedule(schedule_steps, phase.warmup, "warmup_poly", cfg.optimizer.decay_power),
        grad_clip=cfg.optimizer.grad_clip, zero_stage=cfg.engine.zero_stage, compile=cfg.engine.compile,
        reduce_bucket_size=cfg.engine.reduce_bucket_size, allgather_bucket_size=cfg.engine.allgather_bucket_size,
        checkpoint_dir=run.layout.checkpoints, checkpoint_every=cfg.engine.checkpoint_every,
        keep_checkpoints=cfg.engine.keep_checkpoints, log_every=cfg.engine.log_every,
        allow_world_size_change=run.allow_world_size_change)


def geometry(model: BertForPreTraining) -> dict:
    return {"heads_per_layer": model.config.heads_per_layer, "ffn_per_layer": model.config.ffn_per_layer}


def train_stage(run: Run, stage: str, model: BertForPreTraining, phase: PhaseConfig, schedule_steps: int,
                steps: int, hooks: list[StageHook] = (), save_to: Path | None = None,
                continue_from: str | None = None) -> dict:
    """Train one stage on the backend and return its progress record. A stage resumes from its own newest
    checkpoint, else starts from the hand-off ``continue_from`` left (weights + optimizer state); it leaves a
    hand-off of its own, and its fp32 weights in ``save_to`` (HF format), before the engine is released."""
    data, first_samples = run.cfg.data, {}
    evaluation = None if run.validation is None else ValidationHook(
        run.validation, run.cfg.eval.every, run.tensorboard,
        step_offset=sum(run.progress[name].get("steps") or 0 for name in STAGES[:STAGES.index(stage)]
                        if name in run.progress))
    hooks = [*hooks, evaluation] if evaluation is not None else hooks

    def open_batches(micro_batches_done: int) -> Iterator[dict]:
        stream = PretrainingBatches(
            run.corpus, phase.seq_len, phase.max_predictions, phase.micro_batch_size, run.runtime.rank,
            run.runtime.world_size, seed=data.seed, masked_lm_prob=data.masked_lm_prob,
            short_seq_prob=data.short_seq_prob, whole_word_masking=data.whole_word_masking,
            start_sample=micro_batches_done * phase.micro_batch_size * run.runtime.world_size,
            plan_cache=run.layout.plans)  # built once by rank 0, memory-mapped by every rank
        first_samples["by_rank"] = from_every_rank(stream.batch_indices(stream.samples_consumed))
        accumulation = phase.global_batch_size // (phase.micro_batch_size * run.runtime.world_size)
        return prefetched(stream, data.num_workers, data.prefetch, pin_memory=run.runtime.device.type == "cuda",
                          step_batches=accumulation)  # a whole step in flight

    with Stage.build(model, stage_settings(run, stage, phase, schedule_steps), run.runtime,
                     run.tensorboard) as built:
        if not built.resume(hooks) and continue_from is not None:
            built.load_handoff(f"{continue_from}_end", geometry(model), with_optimizer=not phase.reset_optimizer)
        result = built.run(open_batches, steps, hooks)
        if evaluation is not None:  # the stage's end, also after a hook stopped it early
            evaluation.finish(built)
        if save_to is not None:
            built.save_handoff(f"{stage}_end", geometry(model))
            if run.is_main:
                save_pretrained(built.module, save_to)
    record = {**result.to_dict(), "samples": result.steps * phase.global_batch_size,
              "first_samples_by_rank": first_samples["by_rank"]}
    if evaluation is not None:
        evaluation.add_to(record)
    return record


def run_search(run: Run, dense_steps: dict[str, int]) -> Ticket:
    """Search (phase-1 settings, loss + λ‖c‖₁) and draw: the ticket every rank agrees on, saved as ticket.json."""
    cfg, layout = run.cfg, run.layout
    if "draw" in run.progress:  # drawn before a restart: rank 0's copy reaches every rank
        return Ticket.from_dict(on_main_rank(lambda: Ticket.load(layout.ticket).to_dict()), where=str(layout.ticket))
    model = initial_model(cfg, slimming=True)
    if run.is_main and not layout.theta0.is_dir():
        save_pretrained(model, layout.theta0)  # θ0, before any step: re-initialisation rewinds to it
    barrier()
    search_steps = cfg.search.steps  # validate() refused more than phase 1's steps
    search = SlimmingSearch(cfg.search, cfg.search.heads_to_prune_for(cfg.model), search_steps, model.config,
                            run.tensorboard)
    record = train_stage(run, "search", model, cfg.phase1, dense_steps["phase1"], search_steps, [search])
    started = time.perf_counter()
    outcome = search.finish(record["steps"])
    if run.is_main:
        outcome.ticket.save(layout.ticket)
    draw_seconds = time.perf_counter() - started
    if run.is_main:
        report = ticket_report(outcome.ticket, cfg.model)
        logger.info("ticket drawn at search step %d\n%s", record["steps"], render_report(report))
        outcome.history.save(layout.mask_history)
        outcome.history.save_heatmap(layout.heatmap)
        run.tensorboard.image("search/mask_distance_heatmap", outcome.history.heatmap_image(), record["steps"])
        atomic_write_json(layout.ticket_report, report)
    record["early_bird_update"] = outcome.early_bird_update
    run.finish_stage("search", record)
    run.finish_stage("draw", {"digest": outcome.ticket.digest(), "digests_by_rank": outcome.digests_by_rank,
                              "timing": {"total_seconds": draw_seconds}})
    return outcome.ticket


def phase1_model(run: Run, ticket: Ticket | None) -> BertForPreTraining:
    """The model phase 1 trains: dense θ0, or the ticket applied to θ0 (rewind) or a fresh random init. θ0 is
    rebuilt from the seed (equal to theta0/, which is kept for the user), so no rank reads another's disk."""
    cfg = run.cfg
    theta0 = initial_model(cfg, slimming=False)
    if ticket is None:
        return theta0
    pruned = prune(theta0, ticket)
    if cfg.reinit == "random":
        torch.manual_seed(cfg.seed + 1)
        pruned = BertForPreTraining(pruned.config)
    return pruned


def obtain_ticket(run: Run, dense_steps: dict[str, int]) -> Ticket | None:
    cfg = run.cfg
    if cfg.mode in ("dense", "reduced"):
        return None
    if cfg.mode == "earlybert":
        return run_search(run, dense_steps)
    if cfg.mode == "random":
        ticket = random_ticket(cfg.model, cfg.search.heads_to_prune_for(cfg.model), cfg.search.ffn_ratio,
                               cfg.search.ffn_scope, seed=cfg.seed, ffn_multiple_of=cfg.search.ffn_multiple_of)
    else:
        ticket = Ticket.load(cfg.ticket)
        ticket.check_fits(cfg.model)
    if run.is_main:
        ticket.save(run.layout.ticket)
        atomic_write_json(run.layout.ticket_report, ticket_report(ticket, cfg.model))
    barrier()
    return ticket


def train_phases(run: Run, ticket: Ticket | None) -> None:
    """Phase 1 from θ0 (the ticket applied to it), phase 2 continuing from phase 1's hand-off checkpoint: nothing
    a stage needs comes from a file only rank 0 wrote (θ0 is rebuilt from the seed on every rank)."""
    cfg, layout, steps = run.cfg, run.layout, phase_steps(run.cfg, dense=ticket is None)
    for name, phase in (("phase1", cfg.phase1), ("phase2", cfg.phase2)):
        if name in run.progress:
            continue
        started = time.perf_counter()
        model = phase1_model(run, ticket)  # phase 2: the same architecture, its weights come from the hand-off
        build_seconds = time.perf_counter() - started
        logger.info("%s: %s parameters, %d steps", name, f"{model.num_parameters():,}", steps[name])
        folder = layout.model_folder(name)
        record = train_stage(run, name, model, phase, steps[name], steps[name], save_to=folder,
                             continue_from="phase1" if name == "phase2" else None)
        record["timing"]["model_build_seconds"] = build_seconds  # the re-init cost for a pruned phase 1
        if run.is_main and name == "phase2":
            copy_tokenizer_files(run.corpus.vocab_path.parent, folder)
            if ticket is not None:
                ticket.save(folder / "ticket.json")
        del model
        run.finish_stage(name, record)


def check_comparable(run_dir: Path) -> None:
    """A --compare-to run must have finished with a report holding the times compared; checked before training."""
    path = run_dir / "report.json"
    if not path.is_file():
        raise RunError(f"--compare-to {run_dir}: no report.json there (run the dense baseline first)")
    report = read_json(path, "run report", RunError)
    try:
        float(report["total_seconds"])
        for phase in ("phase1", "phase2"):
            float(report["stages"][phase]["mean_step_seconds"])
    except (KeyError, TypeError, ValueError) as err:
        raise RunError(f"--compare-to {path}: not a finished run's report (missing or bad {err}); give the folder "
                       "of a finished pre-training run") from None


def reduce_steps(cfg: PretrainConfig, compare_to: list[Path], match_time: Path | None,
                 match_flops: Path | None) -> tuple[PretrainConfig, reduced.StepMatch | None]:
    """mode=reduced: the config with total_steps set to match the EarlyBERT run's time or FLOPs (Appendix A)."""
    flag = "--match-time" if match_time is not None else "--match-flops" if match_flops is not None else None
    if cfg.mode != "reduced":
        if flag is not None:
            raise RunError(f"{flag}: only with mode=reduced (this run is mode={cfg.mode})")
        return cfg, None
    if (match_time is None) == (match_flops is None):
        raise RunError("mode=reduced: give one of --match-time EARLYBERT_RUN or --match-flops EARLYBERT_RUN")
    share = PRESETS[cfg.preset]
    if match_time is not None:
        match = reduced.match_time(match_time, compare_to, share)
    else:
        match = reduced.match_flops(match_flops, cfg, share)
    logger.info("reduced: %d + %d steps match %s's %s (%.4g vs %.4g)", match.steps["phase1"], match.steps["phase2"],
                match.run, match.matched, match.cost, match.target)
    return dataclasses.replace(cfg, total_steps=match.total_steps), match


@leaving_process_group()  # a group created here ends here: pretrain() runs again in the same process
def pretrain(cfg: PretrainConfig, resume: bool = False, overwrite: bool = False,
             compare_to: Path | list[Path] | None = None, match_time: Path | None = None,
             match_flops: Path | None = None, allow_world_size_change: bool = False) -> dict:
    """The whole recipe as a table of contents: join the ranks, check, prepare the folder, ticket, phases, report.
    ``allow_world_size_change``: resume checkpoints written by another number of ranks (ZeRO 0)."""
    compare_to = [] if compare_to is None else [Path(compare_to)] if isinstance(compare_to, str | Path) else compare_to
    rank, world_size, device = init_distributed(cfg.engine.collective_timeout_s)
    # No force=True: a host application's (or pytest's) logging set-up stays as it is.
    logging.basicConfig(stream=sys.stdout, format=f"%(asctime)s [rank {rank}] %(message)s")
    logging.getLogger("earlybert_pretrain").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    with agreed():  # a check failing on one rank alone stops every rank at once, with that rank's line
        for other in compare_to:
            check_comparable(other)
        cfg, match = reduce_steps(cfg, compare_to, match_time, match_flops)
        validate(cfg, world_size)
        corpus = ShardedCorpus(cfg.data.shard_dir, "train", verify=cfg.data.verify)  # corrupt shards: before folder
        layout = RunLayout(Path(cfg.output_dir))
        runtime = Runtime(rank, world_size, device, resolve_precision(cfg.engine.precision, device))
        validation = Validation.open(cfg, runtime)
        run_folder.check_writable(layout.root)
    # One run per folder: rank 0 holds the folder's lock for the run's life (the OS drops it on a crash).
    with agreed_context(hold_run_lock(layout.root, "pre-training run") if runtime.is_main
                        else contextlib.nullcontext()):
        progress = prepare_output(cfg, layout, resume, overwrite)
        tensorboard = TensorBoardLogger(layout.tensorboard, enabled=runtime.is_main)
        run = Run(cfg, layout, runtime, tensorboard, progress, corpus, validation, allow_world_size_change)
        ticket = obtain_ticket(run, phase_steps(cfg, dense=True))
        train_phases(run, ticket)
        report = None
        if run.is_main:
            matched = [Path(match.run)] if match is not None and Path(match.run) not in compare_to else []
            others = compare_to + matched  # dense, EarlyBERT and this reduced run side by side
            report = write_run_report(layout.root, cfg.mode, run.progress, others,
                                      match.to_dict() if match is not None else None)
            print(render_run_report(report), end="")
        run.tensorboard.close()
        barrier()
    return report
