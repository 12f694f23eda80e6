"""The downstream table (paper Tables 2 and 5): fine-tune one or more pre-trained folders on every GLUE / SQuAD task
whose data is present, in the paper's modes, and lay the scores out as the paper does.

    earlybert-downstream --model BERT=runs/dense/final_model --model EarlyBERT=runs/earlybert/final_model \\
        --data-dir glue_data --output-dir runs/downstream
    earlybert-downstream --model BERT=bert-base --modes dense,earlybert,random --data-dir glue_data ...

Each (model, mode, task) is one ordinary fine-tuning run in ``output_dir/<model>-<mode>/<task>/`` (kept): a finished
one (metrics.json) is read, not rerun; an unfinished one is resumed; so the command resumes task by task. Metrics are
the paper's (Sec. 4.1): Matthews correlation for CoLA, matched accuracy for MNLI, F1 for SQuAD v1.1, Spearman for
STS-B, accuracy for the other GLUE tasks, each the best epoch's dev score (metrics.json's ``scores``). "Time saved" is
1 - a run's Sec. 4.1 time over the reference row's (the first model's first mode) on the same task: the mean over
tasks and the range, as the paper's last column.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from earlybert_pretrain.common.files import atomic_write_json, atomic_write_text
from earlybert_pretrain.config import load_config
from earlybert_pretrain.errors import ConfigError
from earlybert_pretrain.finetune.config import MODES, FinetuneConfig
from earlybert_pretrain.finetune.tasks import get_task

logger = logging.getLogger(__name__)

# The folder names of the GLUE download script and of SQuAD, per task; the first that holds the task's train file wins.
TASK_FOLDERS = {"cola": ("CoLA",), "sst2": ("SST-2",), "mrpc": ("MRPC",), "stsb": ("STS-B",), "qqp": ("QQP",),
                "mnli": ("MNLI",), "qnli": ("QNLI",), "rte": ("RTE",), "squad": ("SQuAD", "squad")}
# Sec. 4.1: "Matthew's correlation score for CoLA, matched accuracy for MNLI, F1-score for SQuAD v1.1, and accuracy
# in percentage for other tasks on GLUE"; STS-B (not in the paper) by Spearman, as GLUE reports it.
PAPER_METRIC = {"cola": "mcc", "squad": "f1", "stsb": "spearman"}
# reduced matches the time of the same model's earlybert run on the task, so earlybert runs first.
MODE_ORDER = ("dense", "earlybert", "random", "ticket", "reduced")


@dataclass(frozen=True)
class Row:
    label: str  # the model's name in the table
    model_dir: str
    mode: str

    @property
    def name(self) -> str:
        return f"{self.label}-{self.mode}"


def present_tasks(data_dir: Path, wanted: list[str] | None = None) -> dict[str, Path]:
    """Task -> its folder under ``data_dir``, for every task (of ``wanted``) whose training file is there."""
    found = {}
    for task, folders in TASK_FOLDERS.items():
        if wanted and task not in wanted:
            continue
        for folder in folders:
            if (data_dir / folder / get_task(task).tsv_files["train"]).is_file():
                found[task] = data_dir / folder
                break
    return found


def paper_score(task: str, metrics: dict) -> float:
    """The score the paper reports for ``task`` from a run's metrics.json."""
    spec = get_task(task)
    return metrics["scores"][spec.eval_splits[0]][PAPER_METRIC.get(task, "accuracy")]


def _run_one(row: Row, task: str, folder: Path, output: Path, overrides: list[str], config_file: str | None,
             rows_done: dict[tuple[Row, str], Path]) -> dict:
    from earlybert_pretrain.finetune.trainer import run  # torch, datasets: only when something runs

    metrics_file = output / "metrics.json"
    if metrics_file.is_file():
        logger.info("%s on %s: finished earlier (%s)", row.name, task, metrics_file)
        return json.loads(metrics_file.read_text())
    settings = [f"task={task}", f"model_dir={row.model_dir}", f"mode={row.mode}", f"output_dir={output}",
                f"data.data_dir={folder}"]
    if row.mode == "reduced":
        earlybert = rows_done.get((Row(row.label, row.model_dir, "earlybert"), task))
        if earlybert is None:
            raise ConfigError(f"--modes: reduced matches the time of an earlybert run of {row.label!r} on {task}; "
                              "add earlybert to --modes")
        settings.append(f"match_time={earlybert}")
    config = load_config(FinetuneConfig, config_file, settings + overrides)
    logger.info("%s on %s -> %s", row.name, task, output)
    return run(config, resume=output.exists())


def build_table(rows: list[Row], tasks: dict[str, Path], output_dir: Path, overrides: list[str],
                config_file: str | None = None) -> dict:
    """Run (or read) every (row, task) and return the table: scores, their average and the time saved per row."""
    done: dict[tuple[Row, str], Path] = {}
    results: dict[str, dict] = {}
    for row in rows:
        results[row.name] = {"model": row.model_dir, "mode": row.mode, "scores": {}, "seconds": {}}
        for task, folder in tasks.items():
            output = output_dir / row.name / task
            metrics = _run_one(row, task, folder, output, overrides, config_file, done)
            done[(row, task)] = output
            results[row.name]["scores"][task] = paper_score(task, metrics)
            results[row.name]["seconds"][task] = metrics["time"]["total_seconds"]
    reference = results[rows[0].name]
    for result in results.values():
        scores = list(result["scores"].values())
        result["average"] = sum(scores) / len(scores)
        saved = [1.0 - result["seconds"][task] / reference["seconds"][task] for task in tasks]
        result["time_saved"] = {"mean": sum(saved) / len(saved), "min": min(saved), "max": max(saved)}
    return {"tasks": list(tasks), "metrics": {task: PAPER_METRIC.get(task, "accuracy") for task in tasks},
            "reference": rows[0].name, "rows": results}


def format_table(table: dict) -> str:
    """The paper's layout: one row per method, a column per task, the average and the time saved."""
    tasks = table["tasks"]
    header = ["Methods", *(f"{task.upper()} ({table['metrics'][task]})" for task in tasks), "Avg.", "Time Saved"]
    lines = [header]
    for name, row in table["rows"].items():
        saved = row["time_saved"]
        time_saved = "-" if name == table["reference"] else (
            f"{100 * saved['mean']:.0f}% ({100 * saved['min']:.0f}~{100 * saved['max']:.0f}%)")
        lines.append([name, *(f"{row['scores'][task]:.2f}" for task in tasks), f"{row['average']:.2f}", time_saved])
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def parse_rows(models: list[str], modes: list[str]) -> list[Row]:
    """``NAME=FOLDER`` models x modes, the modes in the order reduced needs."""
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise ConfigError(f"--modes: unknown mode {unknown[0]!r}; expected some of {', '.join(MODES)}")
    rows = []
    for given in models:
        label, separator, folder = given.partition("=")
        if not separator or not label or not folder:
            raise ConfigError(f"--model: expected NAME=FOLDER (e.g. BERT=runs/dense/final_model), got {given!r}")
        if not Path(folder).is_dir():
            raise ConfigError(f"--model {label}: {folder} is not a folder")
        rows += [Row(label, folder, mode) for mode in sorted(set(modes), key=MODE_ORDER.index)]
    names = [row.name for row in rows]
    if len(set(names)) != len(names):
        raise ConfigError("--model: two models share a name; give each its own NAME=")
    return rows


def write_table(table: dict, output_dir: Path) -> str:
    text = format_table(table)
    atomic_write_json(output_dir / "table.json", table)
    atomic_write_text(output_dir / "table.txt", text + "\n")
    return text

