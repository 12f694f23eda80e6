"""Fine-tuning settings with the paper's defaults (Sec. 4.1-4.2); loaded with ``config.load_config`` (YAML + key=value).

``None`` means "the paper's value for this task and mode", resolved by ``resolve_schedule``,
``resolve_max_seq_length`` and ``SearchConfig.heads_to_prune_for``: dense GLUE 3 epochs at 2e-5, dense SQuAD 2 epochs
at 3e-5 (Sec. 4.1); a pruned model (earlybert / random / ticket) trains 2 epochs at 2x the learning rate on GLUE and
keeps SQuAD's default epochs and rate (Sec. 4.2); ``reduced`` (BERT-Reduced, Appendix A) is dense at the dense rate
for the steps ``match_time`` / ``match_flops`` choose (``finetune/reduced.py``). Any number, 0 included, means what it
says.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Literal

from earlybert_pretrain.config import EngineConfig, Precision, SearchConfig
from earlybert_pretrain.errors import ConfigError
from earlybert_pretrain.finetune.tasks import TaskSpec

FinetuneMode = Literal["dense", "earlybert", "random", "ticket", "reduced"]
SearchObjective = Literal["task", "mlm"]
MODES = typing.get_args(FinetuneMode)


@dataclass
class FinetuneDataConfig:
    data_dir: str = ""  # GLUE task folder (train.tsv, dev.tsv | dev_matched.tsv + dev_mismatched.tsv) or SQuAD folder
    train_file: str = ""  # overrides data_dir for the training split
    validation_files: list[str] = field(default_factory=list)  # one per eval split (MNLI: matched, mismatched)
    text_columns: list[str] = field(default_factory=list)  # your column names for the task's text columns, in order
    label_column: str = ""  # your label column name ("label" by default)
    max_train_examples: int | None = None  # None: all
    max_eval_examples: int | None = None


@dataclass
class FinetuneSearchConfig(SearchConfig):
    """EarlyBERT's search and draw for fine-tuning (Sec. 4.2): 0.2 epoch, lambda 1e-4, the paper's heads per layer
    for the model's size (``heads_to_prune`` None: 4 of 12), 40% FFN. The shared fields are ``config.SearchConfig``."""

    steps: int | None = None  # None: search ``epochs`` of an epoch (small sets need more than 0.2 epoch)
    heads_to_prune: float | None = None
    ffn_ratio: float = 0.4
    epochs: float = 0.2
    lr: float | None = None  # None: the dense fine-tuning learning rate, held constant during the search
    warn_below_steps: int = 100  # fewer search steps than this: coefficient rankings may not have settled
    # task: search on the task's loss (Sec. 4.2); mlm: on masked-LM over the task's own text (Appendix B, Table 8)
    objective: SearchObjective = "task"

    def planned_steps(self, steps_per_epoch: int) -> int:
        """``steps`` when given, else ``epochs`` of an epoch (the paper's 0.2), at least one step."""
        return self.steps if self.steps is not None else max(1, math.ceil(self.epochs * steps_per_epoch))


@dataclass
class FinetuneConfig:
    task: str = "sst2"
    model_dir: str = ""  # an HF-format BERT folder (ours, pruned or not, or a transformers checkpoint)
    output_dir: str = "runs/finetune"
    mode: FinetuneMode = "dense"
    ticket: str = ""  # ticket.json for mode "ticket"
    seed: int = 42  # model head init, data order, and the random ticket (the paper averages 5 seeds)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    search: FinetuneSearchConfig = field(default_factory=FinetuneSearchConfig)
    max_seq_length: int | None = None  # None: 128 for GLUE, 384 for SQuAD
    doc_stride: int = 128  # SQuAD, BERT's run_squad.py settings
    max_query_length: int = 64
    n_best_size: int = 20
    max_answer_length: int = 30
    batch_size: int = 32  # global: split over data-parallel ranks
    eval_batch_size: int = 64
    epochs: float | None = None  # None: 3 (GLUE) / 2 (SQuAD) for dense
    lr: float | None = None  # None: 2e-5 (GLUE) / 3e-5 (SQuAD) for dense
    pruned_epochs: float | None = None  # None: 2 (GLUE) / the dense epochs (SQuAD)
    pruned_lr_scale: float | None = None  # None: 2 (GLUE) / 1 (SQuAD)
    warmup: float = 0.1  # fraction of the steps with linear warmup, then linear decay to 0
    weight_decay: float = 0.01
    adam_eps: float = 1e-6
    grad_clip: float = 1.0
    precision: Precision = "auto"
    collective_timeout_s: float = EngineConfig.collective_timeout_s  # a stalled rank stops the run after this
    dense_metrics: str = ""  # metrics.json of a dense run on the same data: adds the time saving
    match_time: str = ""  # mode reduced: an EarlyBERT run (folder or metrics.json) whose time the steps match
    match_flops: str = ""  # mode reduced: an EarlyBERT run whose training FLOPs the steps match
    log_every: int = 10
    eval_each_epoch: bool = True
    checkpoint_every: int = 500  # steps between checkpoints of the search and the fine-tuning (--resume continues)
    keep_checkpoints: int = 2

    def validate(self) -> None:
        """What the loader's types cannot say (the enumerations are checked when the config is loaded)."""
        if self.mode == "ticket" and not self.ticket:
            raise ConfigError("mode 'ticket' needs ticket=PATH (a ticket.json)")
        matching = [name for name in ("match_time", "match_flops") if getattr(self, name)]
        if matching and self.mode != "reduced":
            raise ConfigError(f"{matching[0]}: only with mode 'reduced' (this run is mode {self.mode!r})")
        if self.mode == "reduced" and len(matching) != 1:
            raise ConfigError("mode 'reduced' needs one of match_time=RUN (--match-time) or match_flops=RUN "
                              "(--match-flops): a finished EarlyBERT fine-tuning run")
        if not self.model_dir:
            raise ConfigError("model_dir (--model): give an HF-format BERT folder (config.json, weights, "
                              "vocab.txt or tokenizer.json)")
        for name in ("batch_size", "eval_batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.search.record_every < 1:
            raise ConfigError(f"search.record_every: expected >= 1, got {self.search.record_every}")
        if self.search.steps is not None and self.search.steps < 1:
            raise ConfigError(f"search.steps: expected >= 1 (or null: search.epochs), got {self.search.steps}")
        for name in ("lr", "epochs", "pruned_epochs", "pruned_lr_scale", "search.lr"):
            value = self.search.lr if name == "search.lr" else getattr(self, name)
            if value is not None and not value >= 0:
                raise ConfigError(f"{name}: expected a number >= 0 (or null: the paper's value), got {value}")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"warmup: expected a fraction of the steps in [0, 1), got {self.warmup}")


def resolve_schedule(config: FinetuneConfig, task: TaskSpec) -> tuple[float, float]:
    """(epochs, peak learning rate) for this run's mode: the paper's values where the config leaves None."""
    squad = task.kind == "squad"
    epochs = _given(config.epochs, 2.0 if squad else 3.0)
    lr = _given(config.lr, 3e-5 if squad else 2e-5)
    if config.mode in ("dense", "reduced"):  # reduced: its steps are matched, not counted in epochs
        return epochs, lr
    pruned_epochs = _given(config.pruned_epochs, epochs if squad else 2.0)
    return pruned_epochs, lr * _given(config.pruned_lr_scale, 1.0 if squad else 2.0)


def resolve_max_seq_length(config: FinetuneConfig, task: TaskSpec) -> int:
    """``max_seq_length``, or BERT's 384 for SQuAD and 128 for GLUE when it is None."""
    return _given(config.max_seq_length, 384 if task.kind == "squad" else 128)


def _given(value: float | None, paper_value: float) -> float:
    return paper_value if value is None else value
