"""One fine-tuning run: data -> model -> [search -> draw | random | given ticket] -> prune -> train -> metrics.json.

Modes (Sec. 4.2): ``dense`` fine-tunes the whole model; ``earlybert`` searches on a copy with slimming coefficients,
draws a ticket, rewinds to the pre-trained weights and prunes them, then fine-tunes the smaller model; ``random``
prunes a random ticket with the same counts; ``ticket`` applies a ticket from elsewhere (e.g. pre-training);
``reduced`` fine-tunes the whole model for the steps matching an EarlyBERT run's time or FLOPs (Appendix A, see
``reduced.py``). With ``search.objective=mlm`` the search trains masked-LM on the task's own text (Appendix B).
Outputs in ``output_dir``: metrics.json (scores per epoch, the best epoch's, time per stage, saving vs a dense run),
ticket.json, search/ (mask history + Figure-1 heatmap), best/ (best epoch) and model/ (last epoch) as HF folders with
the tokenizer, and tensorboard/.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import torch
from safetensors import safe_open

from earlybert_pretrain.common import run_folder
from earlybert_pretrain.common.files import atomic_write_json, read_json, sha256_file
from earlybert_pretrain.common.lock import hold_run_lock
from earlybert_pretrain.common.masking import mask_tokens
from earlybert_pretrain.common.tokens import IGNORE_INDEX
from earlybert_pretrain.config import OptimizerConfig
from earlybert_pretrain.errors import ConfigError, DataError, ModelFolderError
from earlybert_pretrain.finetune import reduced
from earlybert_pretrain.finetune.config import FinetuneConfig, resolve_max_seq_length, resolve_schedule
from earlybert_pretrain.finetune.data import TaskData, load_task_data, local_files
from earlybert_pretrain.finetune.features import encode_classification, load_tokenizer
from earlybert_pretrain.finetune.loop import TrainBatches, model_inputs, predict, score, train_batches
from earlybert_pretrain.finetune.models import build_task_model
from earlybert_pretrain.finetune.squad import SquadSettings, build_features
from earlybert_pretrain.finetune.tasks import TaskSpec, get_task
from earlybert_pretrain.model.bert import BertForPreTraining
from earlybert_pretrain.model.hf import SAFETENSORS_NAME, copy_tokenizer_files, load_pretrained, read_state_dict
from earlybert_pretrain.tickets.draw import random_ticket
from earlybert_pretrain.tickets.prune import prune
from earlybert_pretrain.tickets.search import SearchOutcome, SlimmingSearch
from earlybert_pretrain.tickets.ticket import Ticket
from earlybert_pretrain.train.checkpoint import check_shared
from earlybert_pretrain.train.distributed import agreed, agreed_context, barrier, leaving_process_group, on_main_rank
from earlybert_pretrain.train.engine import init_distributed, resolve_precision
from earlybert_pretrain.train.stage import Runtime, Schedule, Stage, StageHook, StageResult, StageSettings
from earlybert_pretrain.train.telemetry import TensorBoardLogger

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalSet:
    examples: datasets.Dataset
    features: datasets.Dataset


def _encode(task: TaskSpec, examples: datasets.Dataset, tokenizer, config: FinetuneConfig,
            squad: SquadSettings, training: bool) -> datasets.Dataset:
    if task.kind == "squad":
        return build_features(examples, tokenizer, squad, training)
    return encode_classification(examples, task, tokenizer, resolve_max_seq_length(config, task))


def _check_model_fits(tokenizer, model, config: FinetuneConfig, task: TaskSpec) -> None:
    """The tokenizer must be the model's own (same vocab size) and the sequences must fit its position table."""
    if len(tokenizer) != model.config.vocab_size:
        raise ModelFolderError(f"{config.model_dir}: the tokenizer has {len(tokenizer)} tokens but the model's "
                               f"vocab_size is {model.config.vocab_size}; the tokenizer files do not belong to this "
                               "model")
    length = resolve_max_seq_length(config, task)
    if length > model.config.max_position_embeddings:
        raise ConfigError(f"max_seq_length={length} exceeds the model's max_position_embeddings="
                          f"{model.config.max_position_embeddings} ({config.model_dir}); use at most that")


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
        raise ConfigError(f"dense_metrics: {path} is not a metrics.json of a fine-tuning run ({err})") from None
    if dense_mode != "dense" or dense_task != task.name:
        raise ConfigError(f"dense_metrics: {path} is a {dense_mode!r} run on {dense_task!r}; expected a dense run on "
                         f"{task.name!r}")
    return {**dense_time, "path": path}


def _time_report(search: StageResult | None, finetune: StageResult, dense_time: dict | None) -> dict:
    """The paper's protocol (Sec. 4.1): summed per-step times without data I/O, the search included."""
    stages = {"finetune": finetune.timing}
    if search is not None:
        stages["search"] = search.timing
    total = sum(stage["total_seconds"] for stage in stages.values())
    steps = sum(stage["steps"] for stage in stages.values())
    report = {**stages, "total_seconds": total, "total_steps": steps,
              "mean_step_seconds": total / steps if steps else 0.0}
    if dense_time is not None:
        ratio = total / dense_time["total_seconds"]
        report["vs_dense"] = {
            "dense_metrics": dense_time["path"], "total_time_ratio": ratio, "time_saved": 1.0 - ratio,
            "finetune_step_time_ratio": finetune.timing["mean_step_seconds"] / dense_time["finetune"][
                "mean_step_seconds"],
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
        raise DataError(f"task {task.name!r}: no training examples left after loading ({data.skipped})")
    eval_sets = {split: EvalSet(examples, _encode(task, examples, tokenizer, config, squad, training=False))
                 for split, examples in data.evaluation.items()}
    return data, train_features, eval_sets


def _stage_settings(config: FinetuneConfig, name: str, lr: float, schedule: Schedule, runtime: Runtime,
                    allow_world_size_change: bool) -> StageSettings:
    """A fine-tuning stage on the backend (AdamW, Sec. 4.1), checkpointed in output_dir/checkpoints/."""
    optimizer = OptimizerConfig(name="adamw", eps=config.adam_eps, weight_decay=config.weight_decay,
                                grad_clip=config.grad_clip)
    return StageSettings(name=name, seed=config.seed, global_batch_size=config.batch_size,
                         micro_batch_size=config.batch_size // runtime.world_size, optimizer=optimizer, lr=lr,
                         schedule=schedule, grad_clip=config.grad_clip,
                         checkpoint_dir=FinetuneLayout(Path(config.output_dir)).checkpoints,
                         checkpoint_every=config.checkpoint_every, keep_checkpoints=config.keep_checkpoints,
                         log_every=config.log_every, allow_world_size_change=allow_world_size_change)


def _open_batches(batches: TrainBatches, task: TaskSpec, device: torch.device, prepare=None):
    """``open(n)``: model-ready micro-batches from this rank's ``n``-th on, epoch after epoch (the stage's batches).
    ``prepare(batch, n)`` turns the ``n``-th micro-batch into the model's inputs (default: the task's)."""
    prepare = prepare or (lambda batch, _: model_inputs(batch, task, device))

    def open_batches(micro_batches_done: int) -> Iterator[dict]:
        epoch, skip = divmod(micro_batches_done, batches.steps_per_epoch)
        index = micro_batches_done
        while True:
            for position, batch in enumerate(batches.epoch(epoch)):
                if position >= skip:
                    yield prepare(batch, index)
                    index += 1
            epoch, skip = epoch + 1, 0

    return open_batches


class MlmMasking:
    """The MLM search's inputs (Appendix B): the task's own text, 15% of each sequence's real tokens masked by
    BERT's rule (``common.masking``); micro-batch ``n``'s masks come from (seed, rank, n), so a resumed search sees
    the same ones."""

    def __init__(self, tokenizer, seed: int, rank: int, device: torch.device, masked_lm_prob: float = 0.15):
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        bracketed = np.array([t.startswith("[") and t.endswith("]") for t in tokens])
        self.regular_ids = np.flatnonzero(~bracketed)  # random replacements: real tokens, never [PAD]/[CLS]
        self.special_ids = np.array(sorted(set(tokenizer.all_special_ids)))
        self.mask_id, self.seed, self.rank, self.device = tokenizer.mask_token_id, seed, rank, device
        self.masked_lm_prob = masked_lm_prob

    def __call__(self, batch: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
        input_ids, attention = batch["input_ids"].numpy().copy(), batch["attention_mask"].numpy()
        labels = np.full_like(input_ids, IGNORE_INDEX)
        rng = np.random.default_rng([self.seed, self.rank, index])
        for row, ids in enumerate(input_ids):
            candidates = np.flatnonzero((attention[row] == 1) & ~np.isin(ids, self.special_ids))
            budget = max(1, round(int(attention[row].sum()) * self.masked_lm_prob))
            labels[row] = mask_tokens(ids, candidates, budget, rng, self.mask_id, self.regular_ids)
        inputs = {"input_ids": torch.from_numpy(input_ids), "token_type_ids": batch["token_type_ids"],
                  "attention_mask": batch["attention_mask"], "labels": torch.from_numpy(labels)}
        return {name: value.to(self.device, non_blocking=True) for name, value in inputs.items()}


def _has_mlm_head(folder: str) -> bool:
    """Whether the model folder holds MLM head weights (a bare BertModel checkpoint such as MiniLM does not)."""
    path = Path(folder) / SAFETENSORS_NAME
    if path.is_file():
        with safe_open(str(path), framework="pt") as weights:
            keys = list(weights.keys())
    else:
        keys = list(read_state_dict(folder)[0])
    return any(key.startswith("cls.predictions.") for key in keys)


def _mlm_search_model(config: FinetuneConfig) -> BertForPreTraining:
    """The pre-trained encoder with its MLM head (freshly initialised when the folder has none)."""
    if not _has_mlm_head(config.model_dir):
        logger.warning("MLM search: %s has no MLM head weights; the head is freshly initialised (seed %d) and "
                       "trained with the search", config.model_dir, config.seed)
    torch.manual_seed(config.seed)
    return load_pretrained(BertForPreTraining, config.model_dir)


class EpochEvaluation(StageHook):
    """Score the eval splits after each epoch (and at the last step); keep the best epoch's model in ``best/``."""

    def __init__(self, task: TaskSpec, config: FinetuneConfig, eval_sets: dict[str, EvalSet], squad: SquadSettings,
                 runtime: Runtime, tensorboard: TensorBoardLogger, steps_per_epoch: int, total_steps: int,
                 pad_id: int, best_folder: Path):
        self.task, self.config, self.eval_sets, self.squad = task, config, eval_sets, squad
        self.runtime, self.tensorboard, self.pad_id, self.best_folder = runtime, tensorboard, pad_id, best_folder
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.history: list[dict] = []
        self.best: dict | None = None

    def after_step(self, stage: Stage, step: int) -> bool:
        end_of_epoch = step % self.steps_per_epoch == 0 or step == self.total_steps
        if not end_of_epoch or not (self.config.eval_each_epoch or step == self.total_steps):
            return False
        epoch = math.ceil(step / self.steps_per_epoch)
        scores = {split: score(self.task, split_set.examples, split_set.features,
                               predict(stage.module, split_set.features, self.task, self.runtime.device,
                                       self.config.eval_batch_size, self.pad_id, self.runtime.precision),
                               self.squad)
                  for split, split_set in self.eval_sets.items()}
        self.history.append({"epoch": epoch, "step": step, "scores": scores})
        for split, values in scores.items():
            self.tensorboard.scalars(values, step, prefix=f"eval/{split}/")
        primary = scores[self.task.eval_splits[0]][self.task.primary_metric]
        if self.best is None or primary > self.best["primary"]:
            self.best = {"epoch": epoch, "step": step, "primary": primary, "scores": scores}
            if self.runtime.is_main:
                _save_model(stage.module, self.best_folder, self.config.model_dir)
        logger.info("epoch %d (step %d/%d): %s", epoch, step, self.total_steps, scores)
        return False

    def state_dict(self) -> dict:
        return {"history": self.history, "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.best = state["history"], state["best"]


def _search(config: FinetuneConfig, task: TaskSpec, model, batches: TrainBatches, lr: float, runtime: Runtime,
            tensorboard: TensorBoardLogger, plan: RunPlan) -> tuple[SearchOutcome, StageResult]:
    """EarlyBERT's search for fine-tuning (Sec. 3.2, 4.2) on a copy of the pre-trained model with slimming
    coefficients, at the dense learning rate held constant; the copy is thrown away after the draw. On the task's
    loss, or (``search.objective=mlm``, Appendix B) on masked-LM over the task's text with the folder's MLM head."""
    settings = config.search
    planned = settings.planned_steps(batches.steps_per_epoch)
    warnings = []
    if planned < settings.warn_below_steps and settings.stop == "fixed":
        warnings.append(
            f"the search is only {planned} steps (an epoch is {batches.steps_per_epoch} steps); coefficient "
            f"rankings may not have settled below ~{settings.warn_below_steps} steps: set search.steps or "
            "search.stop=early-bird")
        logger.warning(warnings[-1])
    mlm_inputs = plan.mlm_inputs
    searched = _mlm_search_model(config) if mlm_inputs is not None else copy.deepcopy(model)
    searched.add_slimming_coefficients()
    search = SlimmingSearch(settings, settings.heads_to_prune_for(model.config), planned, searched.config,
                            tensorboard)
    search_lr = lr if settings.lr is None else settings.lr
    stage_settings = _stage_settings(config, "search", search_lr, Schedule(planned, kind=None), runtime,
                                     plan.allow_world_size_change)
    with Stage.build(searched, stage_settings, runtime, tensorboard) as stage:
        stage.resume([search])
        result = stage.run(_open_batches(batches, task, runtime.device, mlm_inputs), planned, [search])
    outcome = search.finish(result.steps)
    outcome.warnings[:0] = warnings
    return outcome, result


def _given_ticket(config: FinetuneConfig, model) -> Ticket | None:
    """The ticket a run without a search prunes with: random (same counts as a drawn one) or from a file."""
    if config.mode == "random":
        return random_ticket(model.config, config.search.heads_to_prune_for(model.config), config.search.ffn_ratio,
                             config.search.ffn_scope, seed=config.seed, ffn_multiple_of=config.search.ffn_multiple_of)
    if config.mode == "ticket":
        return Ticket.load(config.ticket)
    return None


class FinetuneLayout:
    """A fine-tuning run's folder, named in one place."""

    def __init__(self, root: Path):
        self.root = root
        self.metrics, self.progress, self.ticket = root / "metrics.json", root / "progress.json", root / "ticket.json"
        self.search = root / "search"
        self.mask_history, self.heatmap = self.search / "mask_history.json", self.search / "mask_heatmap.png"
        self.best, self.model = root / "best", root / "model"
        self.tensorboard, self.checkpoints = root / "tensorboard", root / "checkpoints"

    def owned(self) -> list[str]:
        """What --overwrite removes: the entries a run writes, nothing else."""
        return ["run.json", "metrics.json", "progress.json", "ticket.json", "search", "best", "model", "tensorboard",
                "checkpoints"]


def _inputs(config: FinetuneConfig, task: TaskSpec) -> dict[str, str]:
    """Digests of the model, task data and ticket a run starts from: a resume with changed ones is refused (labels
    edited between a kill and --resume would otherwise be trained on)."""
    folder = Path(config.model_dir)
    inputs = {f"model/{path.name}": sha256_file(path) for path in sorted(folder.iterdir())
              if path.is_file() and path.suffix in (".json", ".safetensors", ".bin", ".txt")}
    files = local_files(task, config.data.train_file, config.data.validation_files, config.data.data_dir)
    inputs.update({f"{split} file {path}": sha256_file(path) for split, path in files.items()})
    if config.ticket:
        inputs["ticket"] = sha256_file(config.ticket)
    return inputs


def _finish_search(layout: FinetuneLayout, outcome: SearchOutcome, result: StageResult, runtime: Runtime,
                   tensorboard: TensorBoardLogger) -> None:
    """Leave the search's files and its record in progress.json: a resumed run skips the search."""
    if runtime.is_main:
        outcome.ticket.save(layout.ticket)
        outcome.history.save(layout.mask_history)
        outcome.history.save_heatmap(layout.heatmap)
        tensorboard.image("search/mask_distance", outcome.history.heatmap_image(), outcome.steps)
        record = {"result": result.to_dict(), "steps": outcome.steps, "planned_steps": outcome.planned_steps,
                  "early_bird_fired_at": outcome.early_bird_fired_at, "warnings": outcome.warnings}
        atomic_write_json(layout.progress, {"search": record})
    barrier()


def _search_or_resume(config: FinetuneConfig, task: TaskSpec, model, batches: TrainBatches, lr: float,
                      runtime: Runtime, tensorboard: TensorBoardLogger, layout: FinetuneLayout, progress: dict,
                      plan: RunPlan) -> tuple[dict, StageResult]:
    """The search's record and stage result: run now, or read back (rank 0's files, to every rank)."""
    if "search" not in progress:
        outcome, result = _search(config, task, model, batches, lr, runtime, tensorboard, plan)
        _finish_search(layout, outcome, result, runtime, tensorboard)
        progress = {"search": {"steps": outcome.steps, "planned_steps": outcome.planned_steps,
                               "early_bird_fired_at": outcome.early_bird_fired_at, "warnings": outcome.warnings,
                               "result": result.to_dict()}}
    record = progress["search"]
    return record, StageResult.from_dict(record["result"])


@dataclasses.dataclass
class RunPlan:
    """What ``run`` settles before the folder is touched: the ticket a run without a search prunes with, a dense
    run's times, the steps of a reduced run, the MLM search's inputs (None: search on the task's loss), whether
    checkpoints of another world size may be resumed."""

    ticket: Ticket | None
    dense_time: dict | None
    match: reduced.StepMatch | None
    mlm_inputs: MlmMasking | None
    allow_world_size_change: bool


def _dense_time(config: FinetuneConfig, task: TaskSpec) -> dict | None:
    """A dense run's times: ``dense_metrics``, or for ``match_time`` the dense run the matched run was compared to."""
    path = config.dense_metrics
    if not path and config.match_time:
        path = reduced.compared_dense_run(config.match_time, task.name)
    return _read_dense_time(path, task)


def _match_steps(config: FinetuneConfig, task: TaskSpec, model, dense_time: dict | None) -> reduced.StepMatch | None:
    """mode=reduced: the dense steps matching the EarlyBERT run's time or FLOPs."""
    if config.match_time:
        match = reduced.match_time(config.match_time, dense_time, task.name)
    elif config.match_flops:
        match = reduced.match_flops(config.match_flops, task.name, model.config, config.batch_size,
                                    resolve_max_seq_length(config, task))
    else:
        return None
    logger.info("reduced: %d dense steps match the %s of %s (%.4g vs %.4g)", match.steps, match.matched, match.run,
                match.steps * match.per_step, match.target)
    return match


@leaving_process_group()  # a group created here ends here: run() runs again in the same process
def run(config: FinetuneConfig, resume: bool = False, overwrite: bool = False,
        allow_world_size_change: bool = False) -> dict:
    """Run the whole fine-tuning; returns what metrics.json holds (written by rank 0). Everything that can be
    checked without training is checked before output_dir is touched. ``allow_world_size_change``: resume
    checkpoints written by another number of ranks (the same global batches; new per-rank random streams)."""
    rank, world_size, device = init_distributed(config.collective_timeout_s)
    with agreed():  # a check failing on one rank alone stops every rank at once, with that rank's line
        config.validate()
        task = get_task(config.task)
        dense_time = _dense_time(config, task)
        runtime = Runtime(rank, world_size, device, resolve_precision(config.precision, device))
        torch.manual_seed(config.seed)
        layout = FinetuneLayout(Path(config.output_dir))
        tokenizer = load_tokenizer(config.model_dir)
        pad_id = tokenizer.pad_token_id
        model = build_task_model(task.kind, config.model_dir, task.num_labels)
        _check_model_fits(tokenizer, model, config, task)
        squad = SquadSettings(resolve_max_seq_length(config, task), config.doc_stride, config.max_query_length,
                              config.n_best_size, config.max_answer_length)
        match = _match_steps(config, task, model, dense_time)
        data, train_features, eval_sets = _prepare_data(config, task, tokenizer, squad)
        given_ticket = _given_ticket(config, model)
        if given_ticket is not None:
            given_ticket.check_fits(model.config)
        mlm = config.mode == "earlybert" and config.search.objective == "mlm"
        mlm_inputs = MlmMasking(tokenizer, config.seed, rank, runtime.device) if mlm else None
        plan = RunPlan(given_ticket, dense_time, match, mlm_inputs, allow_world_size_change)
        run_folder.check_writable(layout.root)
    with agreed_context(hold_run_lock(layout.root, "fine-tuning run") if runtime.is_main
                        else contextlib.nullcontext()):
        def prepare() -> dict:
            run_folder.prepare(layout.root, "fine-tuning", dataclasses.asdict(config), _inputs(config, task),
                               layout.owned(), resume, overwrite, is_main=True)
            return read_json(layout.progress, "progress") if layout.progress.is_file() else {}

        progress = on_main_rank(prepare)
        check_shared(layout.checkpoints)
        return _train(config, task, runtime, layout, progress, model, pad_id, squad, data, train_features, eval_sets,
                      plan)


def _train(config: FinetuneConfig, task: TaskSpec, runtime: Runtime, layout: FinetuneLayout, progress: dict, model,
           pad_id: int, squad: SquadSettings, data: TaskData, train_features: datasets.Dataset,
           eval_sets: dict[str, EvalSet], plan: RunPlan) -> dict:
    """Search (or resume it), prune, fine-tune (resuming its checkpoint), write metrics.json."""
    if "finetune" in progress:  # a finished run: --resume has nothing left to do
        return on_main_rank(lambda: read_json(layout.metrics, "metrics"))
    tensorboard = TensorBoardLogger(layout.tensorboard, enabled=runtime.is_main)
    dense_epochs, dense_lr = resolve_schedule(dataclasses.replace(config, mode="dense"), task)
    epochs, lr = resolve_schedule(config, task)
    batches = train_batches(train_features, config.batch_size, runtime.rank, runtime.world_size, config.seed, pad_id)

    ticket, search, search_result = plan.ticket, None, None
    if config.mode == "earlybert":
        search, search_result = _search_or_resume(config, task, model, batches, dense_lr, runtime, tensorboard,
                                                  layout, progress, plan)
        ticket = Ticket.from_dict(on_main_rank(lambda: Ticket.load(layout.ticket).to_dict()), where=str(layout.ticket))
    if ticket is not None:
        model = prune(model, ticket)  # the pre-trained weights: EarlyBERT rewinds to them (Sec. 4.2)
        if runtime.is_main:
            ticket.save(layout.ticket)

    if plan.match is not None:  # reduced: the matched steps, the schedule decaying to 0 over them
        total_steps = plan.match.steps
        epochs = total_steps / batches.steps_per_epoch
    else:
        total_steps = max(1, round(epochs * batches.steps_per_epoch))
    evaluation = EpochEvaluation(task, config, eval_sets, squad, runtime, tensorboard, batches.steps_per_epoch,
                                 total_steps, pad_id, layout.best)
    settings = _stage_settings(config, "finetune", lr, Schedule(total_steps, config.warmup, "warmup_linear"),
                               runtime, plan.allow_world_size_change)
    with Stage.build(model, settings, runtime, tensorboard) as stage:
        stage.resume([evaluation])
        result = stage.run(_open_batches(batches, task, runtime.device), total_steps, [evaluation])
        if runtime.is_main:
            _save_model(stage.module, layout.model, config.model_dir)

    best, history = evaluation.best, evaluation.history
    metrics = {
        "task": task.name, "mode": config.mode, "model": config.model_dir, "seed": config.seed,
        "primary_metric": task.primary_metric, "best_epoch": best["epoch"], "scores": best["scores"],
        "epochs": history, "final_scores": history[-1]["scores"],
        "schedule": {"epochs": epochs, "lr": lr, "steps": total_steps,
                     "steps_per_epoch": batches.steps_per_epoch, "batch_size": config.batch_size,
                     "dense_epochs": dense_epochs, "dense_lr": dense_lr},
        "time": _time_report(search_result, result, plan.dense_time),
        "reduced": None if plan.match is None else plan.match.to_dict(),
        "losses": {"finetune": result.losses, **({"search": search_result.losses} if search_result else {})},
        "model_geometry": {"heads_per_layer": model.config.heads_per_layer,
                           "ffn_per_layer": model.config.ffn_per_layer, "parameters": model.num_parameters()},
        "ticket": None if ticket is None else {"digest": ticket.digest(), "path": str(layout.ticket)},
        "search": None if search is None else {key: search[key] for key in ("steps", "planned_steps",
                                                                           "early_bird_fired_at")},
        "skipped": data.skipped, "warnings": list(search["warnings"]) if search else [],
        "world_size": runtime.world_size, "config": dataclasses.asdict(config),
    }
    if runtime.is_main:
        atomic_write_json(layout.metrics, metrics)
        atomic_write_json(layout.progress, {**read_json(layout.progress, "progress"), "finetune": True}
                          if layout.progress.is_file() else {"finetune": True})
    tensorboard.close()
    barrier()
    return metrics
