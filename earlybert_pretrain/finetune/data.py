"""Raw examples for a task as ``datasets.Dataset`` objects with the task's column names, checked.

Sources, in order of preference: explicit files (``train_file``, ``validation_files``), a task folder (``data_dir``:
the GLUE task folder with train.tsv / dev.tsv, or train-v1.1.json / dev-v1.1.json for SQuAD) and, when neither is
given, the ``datasets`` hub copy (needs the network). Files: GLUE TSV, SQuAD JSON, or jsonl / json / csv / parquet
with named columns. Labels come out as integer ids (classification) or floats (regression); SQuAD answers stay as
``{"text": [...], "answer_start": [...]}`` and answers that do not occur in their context are counted.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from earlybert_pretrain.errors import ConfigError, DataError
from earlybert_pretrain.finetune.tasks import TaskSpec

logger = logging.getLogger(__name__)

_LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class TaskData:
    train: datasets.Dataset | None
    evaluation: dict[str, datasets.Dataset]  # split name -> examples
    # Counted problems: e.g. {"train/answer_not_in_context": 3}; reported in metrics.json.
    skipped: dict[str, int] = field(default_factory=dict)


def _read_glue_tsv(path: Path, task: TaskSpec) -> tuple[datasets.Dataset, int]:
    """A GLUE TSV file; rows with fewer fields than the header (a few in QQP's train.tsv) are skipped and counted."""
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8-sig", newline="") as handle:  # utf-8-sig: MRPC's files start with a BOM
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise DataError(f"{path}: empty TSV file")
    known = set(task.text_columns) | {"label"} | set(task.tsv_columns)
    if task.tsv_headerless and not known & set(rows[0]):
        header = list(task.tsv_headerless)  # CoLA's train/dev files have no header line
    else:
        header, rows = rows[0], rows[1:]
    header = [task.tsv_columns.get(name, name) for name in header]
    complete = [row for row in rows if len(row) >= len(header)]
    columns = {name: [row[index] for row in complete] for index, name in enumerate(header)}
    return datasets.Dataset.from_dict(columns), len(rows) - len(complete)


def _read_squad_json(path: Path) -> datasets.Dataset:
    """The official nested SQuAD JSON (data -> paragraphs -> qas) flattened to one row per question."""
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a SQuAD v1.1 JSON file ({type(err).__name__}: {err})") from None
    rows = {"id": [], "title": [], "context": [], "question": [], "answers": []}
    for article in articles:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                rows["id"].append(str(qa["id"]))
                rows["title"].append(article.get("title", ""))
                rows["context"].append(paragraph["context"])
                rows["question"].append(qa["question"])
                rows["answers"].append({"text": [a["text"] for a in qa["answers"]],
                                        "answer_start": [int(a["answer_start"]) for a in qa["answers"]]})
    return datasets.Dataset.from_dict(rows)


def read_file(path: str | Path, task: TaskSpec) -> tuple[datasets.Dataset, int]:
    """The file's rows and how many malformed rows were skipped (GLUE TSV only)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    if path.suffix == ".tsv":
        return _read_glue_tsv(path, task)
    if task.kind == "squad" and path.suffix == ".json" and '"paragraphs"' in path.read_text(encoding="utf-8")[:100000]:
        return _read_squad_json(path), 0
    if path.suffix not in _LOADERS:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected .tsv, .json, .jsonl, .csv or "
                         ".parquet")
    try:
        return datasets.load_dataset(_LOADERS[path.suffix], data_files=str(path), split="train"), 0
    except datasets.exceptions.DatasetGenerationError as err:  # a malformed or non-UTF-8 row
        cause = err.__cause__ or err
        raise DataError(f"{path}: cannot read it as {path.suffix[1:]} ({type(cause).__name__}: "
                        f"{str(cause).splitlines()[0] if str(cause) else 'unreadable'})") from None


def _rename_columns(dataset: datasets.Dataset, text_columns: list[str], label_column: str,
                    task: TaskSpec) -> datasets.Dataset:
    """Map user-named columns (``text_columns`` / ``label_column``) onto the task's names."""
    mapping = dict(zip(text_columns, task.text_columns))
    if label_column:
        mapping[label_column] = "label"
    mapping = {old: new for old, new in mapping.items() if old != new and old in dataset.column_names}
    return dataset.rename_columns(mapping) if mapping else dataset


def _label_ids(values: list, task: TaskSpec, where: str) -> list[int]:
    """Integer ids, or label names / digit strings mapped to ids; anything else is refused with examples."""
    names = {name: index for index, name in enumerate(task.labels)}
    ids, bad = [], []
    for value in values:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 1.0 from a JSON or parquet float column
        text = str(value).strip()
        if text in names:
            ids.append(names[text])
        elif text.lstrip("-").isdigit() and 0 <= int(text) < len(task.labels):
            ids.append(int(text))
        else:
            bad.append(value)
    if bad:
        raise DataError(f"{where}: {len(bad)} label(s) outside the task's set {list(task.labels)} "
                         f"(or ids 0..{len(task.labels) - 1}), e.g. {bad[:5]}")
    return ids


def _regression_targets(values: list, where: str) -> list[float]:
    targets = []
    for value in values:
        try:
            targets.append(float(value))
        except (TypeError, ValueError):
            raise DataError(f"{where}: regression label {value!r} is not a number") from None
    return targets


def _count_unanswerable(dataset: datasets.Dataset) -> int:
    """SQuAD rows whose first answer is not the context text at answer_start (or that have no answer)."""
    count = 0
    for context, answers in zip(list(dataset["context"]), list(dataset["answers"])):
        if not answers["text"]:
            count += 1
            continue
        start, text = answers["answer_start"][0], answers["text"][0]
        count += context[start:start + len(text)] != text
    return count


def prepare(dataset: datasets.Dataset, task: TaskSpec, where: str, text_columns: list[str] = (),
            label_column: str = "") -> tuple[datasets.Dataset, int]:
    """Check and normalise one split; returns it and the number of SQuAD answers not found in their context."""
    dataset = _rename_columns(dataset, list(text_columns), label_column, task)
    required = list(task.text_columns) + (["id", "answers"] if task.kind == "squad" else ["label"])
    missing = [name for name in required if name not in dataset.column_names]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing} for task {task.name!r}; the file has "
                         f"{dataset.column_names} (map yours with data.text_columns / data.label_column)")
    if task.kind == "squad":
        return dataset, _count_unanswerable(dataset)
    labels = list(dataset["label"])
    converted = (_regression_targets(labels, where) if task.kind == "regression"
                 else _label_ids(labels, task, where))
    keep = list(task.text_columns)
    dataset = dataset.select_columns(keep).add_column("label", converted)
    for column in task.text_columns:
        if any(text is None for text in list(dataset[column])):
            raise DataError(f"{where}: column {column!r} has empty (null) texts")
    return dataset, 0


def _sources(task: TaskSpec, train_file: str, validation_files: list[str], data_dir: str) -> dict[str, str | None]:
    """Split name -> file (None: take it from the hub)."""
    splits = ("train", *task.eval_splits)
    if validation_files and len(validation_files) != len(task.eval_splits):
        raise ConfigError(f"data.validation_files: task {task.name!r} evaluates on {len(task.eval_splits)} split(s) "
                         f"{list(task.eval_splits)}, got {len(validation_files)} file(s)")
    chosen = dict(zip(splits, [train_file or None, *(validation_files or [None] * len(task.eval_splits))]))
    if data_dir:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise ConfigError(f"data.data_dir: {folder} is not a folder")
        for split in splits:
            if chosen[split] is None:
                chosen[split] = str(folder / task.tsv_files[split])
    return chosen


def local_files(task: TaskSpec, train_file: str, validation_files: list[str], data_dir: str) -> dict[str, str]:
    """Split name -> the local file it is read from (splits taken from the hub are left out)."""
    return {split: path for split, path in _sources(task, train_file, list(validation_files), data_dir).items()
            if path is not None}


def load_task_data(task: TaskSpec, train_file: str = "", validation_files: list[str] = (), data_dir: str = "",
                   text_columns: list[str] = (), label_column: str = "", max_train_examples: int | None = None,
                   max_eval_examples: int | None = None, need_train: bool = True) -> TaskData:
    datasets.disable_progress_bars()  # stderr is for errors (one line each); the stage logs the progress
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its logged tracebacks would precede our one line
    sources = _sources(task, train_file, list(validation_files), data_dir)
    if not need_train:
        sources.pop("train")
    hub = None
    result = TaskData(train=None, evaluation={})
    for split, path in sources.items():
        if path is None:
            if hub is None:
                logger.info("no local file for %s/%s: loading datasets hub %s", task.name, split, task.hub)
                try:
                    hub = datasets.load_dataset(*task.hub)
                except Exception as err:  # offline, or the hub refused: say which files would do instead
                    raise ConfigError(f"task {task.name!r}: no local data given (data.data_dir / data.train_file / "
                                     f"data.validation_files) and the hub copy {task.hub} cannot be loaded "
                                     f"({type(err).__name__}: {err})") from None
            raw, where, malformed = hub[split], f"hub {'/'.join(task.hub)}[{split}]", 0
        else:
            (raw, malformed), where = read_file(path, task), path
        if malformed:
            result.skipped[f"{split}/malformed_tsv_rows"] = malformed
            logger.warning("%s: skipped %d row(s) with fewer fields than the header", where, malformed)
        limit = max_train_examples if split == "train" else max_eval_examples
        if limit is not None and len(raw) > limit:
            raw = raw.select(range(limit))
        dataset, unanswerable = prepare(raw, task, str(where), text_columns, label_column)
        if unanswerable:
            result.skipped[f"{split}/answer_not_in_context"] = unanswerable
            logger.warning("%s: %d SQuAD answer(s) do not occur in their context at answer_start%s", where,
                           unanswerable, "; those questions are left out of training" if split == "train" else "")
        if split == "train":
            result.train = dataset
        else:
            result.evaluation[split] = dataset
    return result
