"""The task registry: GLUE tasks and SQuAD v1.1 as the paper reports them (Sec. 4.1), with their columns and labels.

Column names are those of the ``datasets`` hub copies (``nyu-mll/glue``, ``rajpurkar/squad``); local GLUE TSV files
are mapped onto them by ``tsv_columns`` (GLUE header name -> our name) so every source ends up with the same columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from earlybert_pretrain.errors import ConfigError


class UnknownTaskError(ConfigError):
    """A task name that is not in the registry; the message lists the known ones."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_columns: tuple[str, ...]  # one (single sentence) or two (sentence pair); SQuAD: question, context
    metric_names: tuple[str, ...]  # the first is the one the paper reports and the best epoch is chosen by
    labels: tuple[str, ...] = ()  # label names in id order (hub order); empty for regression and SQuAD
    kind: str = "classification"  # classification | regression | squad
    hub: tuple[str, ...] = ()  # datasets.load_dataset(*hub)
    eval_splits: tuple[str, ...] = ("validation",)  # hub split names; MNLI has two
    tsv_files: dict[str, str] = field(default_factory=dict)  # split -> file name in a GLUE task folder
    tsv_columns: dict[str, str] = field(default_factory=dict)  # GLUE TSV header -> our column name
    tsv_headerless: tuple[str, ...] = ()  # column names for the header-less CoLA train/dev files

    @property
    def num_labels(self) -> int:
        """Outputs of the classifier head: 1 for regression."""
        return len(self.labels) if self.labels else 1

    @property
    def primary_metric(self) -> str:
        return self.metric_names[0]


_GLUE_HUB = "nyu-mll/glue"  # datasets hub ids; used only when no local files are given
_GLUE_FILES = {"train": "train.tsv", "validation": "dev.tsv"}
_ENTAILMENT = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {task.name: task for task in (
    TaskSpec("cola", ("sentence",), ("mcc", "accuracy"), labels=("0", "1"), hub=(_GLUE_HUB, "cola"),
             tsv_files=_GLUE_FILES, tsv_headerless=("source", "label", "original_label", "sentence")),
    TaskSpec("sst2", ("sentence",), ("accuracy",), labels=("0", "1"), hub=(_GLUE_HUB, "sst2"), tsv_files=_GLUE_FILES),
    TaskSpec("mrpc", ("sentence1", "sentence2"), ("f1", "accuracy"), labels=("0", "1"), hub=(_GLUE_HUB, "mrpc"),
             tsv_files=_GLUE_FILES, tsv_columns={"#1 String": "sentence1", "#2 String": "sentence2",
                                                 "Quality": "label"}),
    TaskSpec("stsb", ("sentence1", "sentence2"), ("pearson", "spearman"), kind="regression", hub=(_GLUE_HUB, "stsb"),
             tsv_files=_GLUE_FILES, tsv_columns={"score": "label"}),
    TaskSpec("qqp", ("question1", "question2"), ("accuracy", "f1"), labels=("0", "1"), hub=(_GLUE_HUB, "qqp"),
             tsv_files=_GLUE_FILES, tsv_columns={"is_duplicate": "label"}),
    TaskSpec("mnli", ("premise", "hypothesis"), ("accuracy",), labels=("entailment", "neutral", "contradiction"),
             hub=(_GLUE_HUB, "mnli"), eval_splits=("validation_matched", "validation_mismatched"),
             tsv_files={"train": "train.tsv", "validation_matched": "dev_matched.tsv",
                        "validation_mismatched": "dev_mismatched.tsv"},
             tsv_columns={"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"}),
    TaskSpec("qnli", ("question", "sentence"), ("accuracy",), labels=_ENTAILMENT, hub=(_GLUE_HUB, "qnli"),
             tsv_files=_GLUE_FILES),
    TaskSpec("rte", ("sentence1", "sentence2"), ("accuracy",), labels=_ENTAILMENT, hub=(_GLUE_HUB, "rte"),
             tsv_files=_GLUE_FILES),
    TaskSpec("squad", ("question", "context"), ("f1", "exact_match"), kind="squad", hub=("rajpurkar/squad",),
             tsv_files={"train": "train-v1.1.json", "validation": "dev-v1.1.json"}),
)}


def get_task(name: str) -> TaskSpec:
    key = name.lower().replace("-", "").replace("_", "")
    aliases = {"sst": "sst2", "squad1": "squad", "squadv1": "squad", "squadv11": "squad"}
    key = aliases.get(key, key)
    if key not in TASKS:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[key]
