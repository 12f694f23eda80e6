"""Fine-tuning settings with the paper's defaults (Sec. 4.1-4.2); loaded with ``config.load_config`` (YAML + key=value).

Zeros mean "the paper's value for this task and mode", resolved by ``resolve_schedule`` / ``resolve_heads_to_prune``:
dense GLUE 3 epochs at 2e-5, dense SQuAD 2 epochs at 3e-5 (Sec. 4.1); a pruned model (earlybert / random / ticket)
trains 2 epochs at 2x the learning rate on GLUE and keeps SQuAD's default epochs and rate (Sec. 4.2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from earlybert_pretrain.finetune.tasks import TaskSpec
from earlybert_pretrain.model.bert import BertConfig

MODES = ("dense", "earlybert", "random", "ticket")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class FinetuneDataConfig:
    data_dir: str = ""  # GLUE task folder (train.tsv, dev.tsv | dev_matched.tsv + dev_mismatched.tsv) or SQuAD folder
    train_file: str = ""  # overrides data_dir for the training split
    validation_files: list[str] = field(default_factory=list)  # one per eval split (MNLI: matched, mismatched)
    text_columns: list[str] = field(default_factory=list)  # your column names for the task's text columns, in order
    label_column: str = ""  # your label column name ("label" by default)
    max_train_examples: int = 0  # 0: all
    max_eval_examples: int = 0


@dataclass
class FinetuneSearchConfig:
    """EarlyBERT's search and draw for fine-tuning (Sec. 4.2): 0.2 epoch, lambda 1e-4, 4 heads/layer, 40% FFN."""

    epochs: float = 0.2
    steps: int = 0  # > 0: search this many steps instead of ``epochs`` (small sets need more than 0.2 epoch)
    lr: float = 0.0  # 0: the dense fine-tuning learning rate, held constant during the search
    lam: float = 1e-4
    heads_to_prune: float = 0  # 0: 4 of 12 heads (base), 6 of 16 (large), a third otherwise; or a count / ratio
    ffn_ratio: float = 0.4
    ffn_scope: str = "global"  # global | layerwise
    ffn_multiple_of: int = 8  # kept FFN widths rounded to multiples of 8 (see SearchConfig in ../config.py)
    stop: str = "fixed"  # fixed | early-bird (then epochs/steps is the cap)
    record_every: int = 10  # draw a ticket every this many steps for the mask history / early-bird detector
    early_bird_window: int = 5
    early_bird_eps: float = 0.1
    warn_below_steps: int = 100  # fewer search steps than this: coefficient rankings may not have settled


@dataclass
class FinetuneConfig:
    task: str = "sst2"
    # An HF-format BERT folder (ours, pruned or not, or a transformers checkpoint). Not named ``model``: in
    # config.load_config a string ``model`` names a model-geometry YAML file.
    model_dir: str = ""
    output_dir: str = "runs/finetune"
    mode: str = "dense"  # dense | earlybert | random | ticket
    ticket: str = ""  # ticket.json for mode "ticket"
    seed: int = 42  # model head init, data order, and the random ticket (the paper averages 5 seeds)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    search: FinetuneSearchConfig = field(default_factory=FinetuneSearchConfig)
    max_seq_length: int = 0  # 0: 128 for GLUE, 384 for SQuAD
    doc_stride: int = 128  # SQuAD, BERT's run_squad.py settings
    max_query_length: int = 64
    n_best_size: int = 20
    max_answer_length: int = 30
    batch_size: int = 32  # global: split over data-parallel ranks
    eval_batch_size: int = 64
    epochs: float = 0.0  # 0: 3 (GLUE) / 2 (SQuAD) for dense
    lr: float = 0.0  # 0: 2e-5 (GLUE) / 3e-5 (SQuAD) for dense
    pruned_epochs: float = 0.0  # 0: 2 (GLUE) / the dense epochs (SQuAD)
    pruned_lr_scale: float = 0.0  # 0: 2 (GLUE) / 1 (SQuAD)
    warmup: float = 0.1  # fraction of the steps with linear warmup, then linear decay to 0
    weight_decay: float = 0.01
    adam_eps: float = 1e-6
    grad_clip: float = 1.0
    precision: str = "auto"  # auto: bf16 autocast on GPUs that have it, else fp16; fp32 on CPU
    dense_metrics: str = ""  # metrics.json of a dense run on the same data: adds the time saving
    log_every: int = 10
    eval_each_epoch: bool = True

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "ticket" and not self.ticket:
            raise ValueError("mode 'ticket' needs ticket=PATH (a ticket.json)")
        if not self.model_dir:
            raise ValueError("model_dir (--model): give an HF-format BERT folder (config.json, weights, "
                             "vocab.txt or tokenizer.json)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.search.stop not in ("fixed", "early-bird"):
            raise ValueError(f"search.stop: expected 'fixed' or 'early-bird', got {self.search.stop!r}")
        for name in ("batch_size", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.search.record_every < 1:
            raise ValueError(f"search.record_every: expected >= 1, got {self.search.record_every}")


def resolve_schedule(config: FinetuneConfig, task: TaskSpec) -> tuple[float, float]:
    """(epochs, peak learning rate) for this run's mode: the paper's values where the config leaves 0."""
    squad = task.kind == "squad"
    epochs = config.epochs or (2.0 if squad else 3.0)
    lr = config.lr or (3e-5 if squad else 2e-5)
    if config.mode == "dense":
        return epochs, lr
    pruned_epochs = config.pruned_epochs or (epochs if squad else 2.0)
    return pruned_epochs, lr * (config.pruned_lr_scale or (1.0 if squad else 2.0))


def resolve_heads_to_prune(config: FinetuneConfig, model_config: BertConfig) -> float:
    """Sec. 4.2: prune 4 heads per layer in BERT-base (12 heads), 6 in BERT-large (16); a third elsewhere."""
    if config.search.heads_to_prune:
        return config.search.heads_to_prune
    return {12: 4, 16: 6}.get(model_config.num_attention_heads, max(1, round(model_config.num_attention_heads / 3)))
