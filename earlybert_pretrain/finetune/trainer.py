"""One fine-tuning run: data -> model -> [search -> draw | random | given ticket] -> prune -> train -> metrics.json.

Modes (Sec. 4.2): ``dense`` fine-tunes the whole model; ``earlybert`` searches on a copy with slimming coefficients,
draws a ticket, rewinds to the pre-trained weights and prunes them, then fine-tunes the smaller model; ``random``
prunes a random ticket with the same counts; ``ticket`` applies a ticket from elsewhere (e.g. pre-training).
Outputs in ``output_dir``: metrics.json (scores per epoch, the best epoch's, time per stage, saving vs a dense run),
ticket.json, search/ (mask history + Figure-1 heatmap), best/ (best epoch) and model/ (last epoch) as HF folders with
the tokenizer, and tensorboard/.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import datasets
import torch

from earlybert_pretrain.common.files import atomic_write_json
from earlybert_pretrain.finetune.config import FinetuneConfig, resolve_heads_to_prune, resolve_schedule
from earlybert_pretrain.finetune.data import TaskData, load_task_data
from earlybert_pretrain.finetune.features import encode_classification, load_tokenizer
from earlybert_pretrain.finetune.loop import (
    linear_schedule,
    make_optimizer,
    model_inputs,
    predict,
    score,
    timed_step,
    train_batches,
)
from earlybert_pretrain.finetune.models import build_task_model
from earlybert_pretrain.finetune.runtime import Runtime
from earlybert_pretrain.finetune.search import SearchResult, run_search
from earlybert_pretrain.finetune.squad import SquadSettings, build_features
from earlybert_pretrain.finetune.tasks import TaskSpec, get_task
from earlybert_pretrain.model.hf import copy_tokenizer_files
from earlybert_pretrain.tickets.draw import random_ticket
from earlybert_pretrain.tickets.prune import prune
from earlybert_pretrain.tickets.ticket import Ticket
from earlybert_pretrain.train.telemetry import StepTimer, TensorBoardLogger

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalSet:
    examples: datasets.Dataset
    features: datasets.Dataset


def _encode(task: TaskSpec, examples: datasets.Dataset, tokenizer, config: FinetuneConfig,
            squad: SquadSettings, training: bool) -> datasets.Dataset:
    if task.kind == "squad":
        return build_features(examples, tokenizer, squad, training)
    return encode_classification(examples, task, tokenizer, config.max_seq_length or 128)


def _check_vocab(tokenizer, model_vocab_size: int, folder: str) -> None:
    if len(tokenizer) > model_vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{model_vocab_size}; the tokenizer files do not belong to this model")


def _draw_or_load_ticket(config: FinetuneConfig, task: TaskSpec, model, train_features, lr: float, runtime: Runtime,
                         tensorboard: TensorBoardLogger, pad_id: int) -> tuple[Ticket | None, SearchResult | None]:
    heads_to_prune = resolve_heads_to_prune(config, model.config)
    if config.mode == "earlybert":
        search = run_search(model, task, train_features, config.search, heads_to_prune, config.search.lr or lr,
                            config.batch_size, config.seed, config.weight_decay, config.adam_eps, config.grad_clip,
                            runtime, tensorboard, pad_id)
        return search.ticket, search
    if config.mode == "random":
        return random_ticket(model.config, heads_to_prune, config.search.ffn_ratio, config.search.ffn_scope,
                             seed=config.seed, ffn_multiple_of=config.search.ffn_multiple_of), None
    if config.mode == "ticket":
        return Ticket.load(config.ticket), None
    return None, None


def _save_model(model, folder: Path, tokenizer_source: str) -> None:
    model.save_pretrained(folder)
    copy_tokenizer_files(tokenizer_source, folder)


def _read_dense_time(path: str, task: TaskSpec) -> dict | None:
    """The ``time`` section of a dense run's metrics.json on the same task; checked before training starts."""
    if not path:
        return None
    try:
        dense = json.loads(Path(path).read_text())
        dense_time, dense_mode, dense_task = dense["time"], dense["mode"], dense["task"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"dense_metrics: {path} is not a metrics.json of a fine-tuning run ({err})") from None
    if dense_mode != "dense" or dense_task != task.name:
        raise ValueError(f"dense_metrics: {path} is a {dense_mode!r} run on {dense_task!r}; expected a dense run on "
                         f"{task.name!r}")
    return {**dense_time, "path": path}


def _time_report(search: SearchResult | None, finetune_timer: StepTimer, dense_time: dict | None) -> dict:
    """The paper's protocol (Sec. 4.1): summed per-step times without data I/O, the search included."""
    stages = {"finetune": finetune_timer.summary()}
    if search is not None:
        stages["search"] = search.timer.summary()
    total = sum(stage["total_seconds"] for stage in stages.values())
    steps = sum(stage["steps"] for stage in stages.values())
    report = {**stages, "total_seconds": total, "total_steps": steps,
              "mean_step_seconds": total / steps if steps else 0.0}
    if dense_time is not None:
        ratio = total / dense_time["total_seconds"]
        report["vs_dense"] = {
            "dense_metrics": dense_time["path"], "total_time_ratio": ratio, "time_saved": 1.0 - ratio,
            "finetune_step_time_ratio": finetune_timer.mean_step_seconds / dense_time["finetune"]["mean_step_seconds"],
        }
    return report


def _prepare_data(config: FinetuneConfig, task: TaskSpec, tokenizer,
                  squad: SquadSettings) -> tuple[TaskData, datasets.Dataset, dict[str, EvalSet]]:
    data = load_task_data(task, config.data.train_file, config.data.validation_files, config.data.data_dir,
                          config.data.text_columns, config.data.label_column, config.data.max_train_examples,
                          config.data.max_eval_examples)
    train_features = _encode(task, data.train, tokenizer, config, squad, training=True)
    if task.kind == "squad":
        left_out = len(data.train) - len(set(list(train_features["example_index"])))
        if left_out:
            data.skipped["train/examples_without_features"] = left_out
            logger.warning("%d SQuAD training question(s) produced no training window (answer not in context)",
                           left_out)
    if len(train_features) == 0:
        raise ValueError(f"task {task.name!r}: no training examples left after loading ({data.skipped})")
    eval_sets = {split: EvalSet(examples, _encode(task, examples, tokenizer, config, squad, training=False))
                 for split, examples in data.evaluation.items()}
    return data, train_features, eval_sets


@dataclasses.dataclass
class FinetuneResult:
    history: list[dict]  # per evaluated epoch: epoch, step, scores
    best: dict  # the best epoch's entry (by the task's primary metric on its first eval split)
    timer: StepTimer
    total_steps: int
    steps_per_epoch: int
    losses: list[float]  # per step


def _finetune(model, task: TaskSpec, config: FinetuneConfig, train_features: datasets.Dataset,
              eval_sets: dict[str, EvalSet], epochs: float, lr: float, runtime: Runtime,
              tensorboard: TensorBoardLogger, squad: SquadSettings, pad_id: int) -> FinetuneResult:
    """Train for ``epochs`` with linear warmup / decay, evaluate after each epoch, keep the best in ``best/``."""
    output = Path(config.output_dir)
    wrapped = runtime.wrap(model)
    batches = train_batches(train_features, config.batch_size, runtime, config.seed, pad_id)
    total_steps = max(1, round(epochs * batches.steps_per_epoch))
    optimizer = make_optimizer(wrapped, lr, config.weight_decay, config.adam_eps)
    scheduler = linear_schedule(optimizer, total_steps, config.warmup)
    timer = StepTimer(runtime.device)
    history, best, step_losses = [], None, []
    step, epoch = 0, 0
    wrapped.train()
    while step < total_steps:
        for batch in batches.epoch(epoch):
            inputs = model_inputs(batch, task, runtime.device)
            losses = timed_step(wrapped, inputs, optimizer, scheduler, runtime, timer, config.grad_clip)
            step += 1
            step_losses.append(losses["loss"])
            if step % config.log_every == 0:
                tensorboard.scalars({**losses, "lr": scheduler.get_last_lr()[0]}, step, prefix="train/")
            if step >= total_steps:
                break
        epoch += 1
        if not config.eval_each_epoch and step < total_steps:
            continue
        scores = {split: score(task, split_set.examples, split_set.features,
                               predict(wrapped, split_set.features, task, runtime, config.eval_batch_size, pad_id),
                               squad)
                  for split, split_set in eval_sets.items()}
        history.append({"epoch": epoch, "step": step, "scores": scores})
        for split, values in scores.items():
            tensorboard.scalars(values, step, prefix=f"eval/{split}/")
        primary = scores[task.eval_splits[0]][task.primary_metric]
        if best is None or primary > best["primary"]:
            best = {"epoch": epoch, "step": step, "primary": primary, "scores": scores}
            if runtime.is_main:
                _save_model(model, output / "best", config.model_dir)
        logger.info("epoch %d (step %d/%d): %s", epoch, step, total_steps, scores)
    return FinetuneResult(history, best, timer, total_steps, batches.steps_per_epoch, step_losses)


def run(config: FinetuneConfig) -> dict:
    """Run the whole fine-tuning; returns what metrics.json holds (written by rank 0)."""
    config.validate()
    task = get_task(config.task)
    dense_time = _read_dense_time(config.dense_metrics, task)
    runtime = Runtime.from_env(config.precision)
    torch.manual_seed(config.seed)
    output = Path(config.output_dir)
    tokenizer = load_tokenizer(config.model_dir)
    pad_id = tokenizer.pad_token_id
    squad = SquadSettings(config.max_seq_length or 384, config.doc_stride, config.max_query_length,
                          config.n_best_size, config.max_answer_length)
    data, train_features, eval_sets = _prepare_data(config, task, tokenizer, squad)
    model = build_task_model(task.kind, config.model_dir, task.num_labels)
    _check_vocab(tokenizer, model.config.vocab_size, config.model_dir)
    tensorboard = TensorBoardLogger(output / "tensorboard", enabled=runtime.is_main)
    dense_epochs, dense_lr = resolve_schedule(dataclasses.replace(config, mode="dense"), task)
    epochs, lr = resolve_schedule(config, task)

    ticket, search = _draw_or_load_ticket(config, task, model, train_features, dense_lr, runtime, tensorboard, pad_id)
    if ticket is not None:
        model = prune(model, ticket)  # the pre-trained weights: EarlyBERT rewinds to them (Sec. 4.2)
        if runtime.is_main:
            ticket.save(output / "ticket.json")
            if search is not None:
                search.history.save(output / "search" / "mask_history.json")
                search.history.save_heatmap(output / "search" / "mask_heatmap.png")
                tensorboard.image("search/mask_distance", search.history.heatmap_image(), search.steps)
    result = _finetune(model, task, config, train_features, eval_sets, epochs, lr, runtime, tensorboard, squad, pad_id)

    metrics = {
        "task": task.name, "mode": config.mode, "model": config.model_dir, "seed": config.seed,
        "primary_metric": task.primary_metric, "best_epoch": result.best["epoch"], "scores": result.best["scores"],
        "epochs": result.history, "final_scores": result.history[-1]["scores"],
        "schedule": {"epochs": epochs, "lr": lr, "steps": result.total_steps,
                     "steps_per_epoch": result.steps_per_epoch, "batch_size": config.batch_size,
                     "dense_epochs": dense_epochs, "dense_lr": dense_lr},
        "time": _time_report(search, result.timer, dense_time),
        "losses": {"finetune": result.losses, **({"search": search.losses} if search is not None else {})},
        "model_geometry": {"heads_per_layer": model.config.heads_per_layer,
                           "ffn_per_layer": model.config.ffn_per_layer, "parameters": model.num_parameters()},
        "ticket": None if ticket is None else {"digest": ticket.digest(), "path": str(output / "ticket.json")},
        "search": None if search is None else {"steps": search.steps, "planned_steps": search.planned_steps,
                                               "early_bird_fired_at": search.early_bird_fired_at},
        "skipped": data.skipped, "warnings": list(search.warnings) if search else [],
        "world_size": runtime.world_size, "config": dataclasses.asdict(config),
    }
    if runtime.is_main:
        _save_model(model, output / "model", config.model_dir)
        atomic_write_json(output / "metrics.json", metrics)
    tensorboard.close()
    runtime.barrier()
    return metrics
