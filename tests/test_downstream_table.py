"""``earlybert-downstream``: every task present fine-tuned per model and mode, the paper's metrics laid out as its
Table 2 (average, time saved), finished runs read back and unfinished ones run on a second call."""

import json
import random
import shutil
from pathlib import Path

import pytest
from finetune_fixtures import FILLER, make_tiny_model, sentiment_rows, write_tsv
from test_finetune_data import _squad_file

from earlybert_pretrain.finetune.downstream_cli import main
from earlybert_pretrain.finetune.table import format_table

SETTINGS = ["batch_size=16", "eval_batch_size=32", "epochs=1", "pruned_epochs=1", "max_seq_length=48",
            "doc_stride=16", "search.steps=2", "search.heads_to_prune=1", "log_every=1"]


def _pairs(count: int, seed: int) -> list[list]:
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        first = rng.sample(FILLER[:12], 4)
        second = first if index % 2 else rng.sample(FILLER[:12], 4)
        rows.append([" ".join(first), " ".join(second), index % 2])
    return rows


@pytest.fixture(scope="module")
def glue(tmp_path_factory) -> Path:
    """SST-2, MRPC and STS-B folders in the GLUE download's layout, and SQuAD/."""
    root = tmp_path_factory.mktemp("glue")
    for split, seed in (("train", 0), ("dev", 1)):
        (root / "SST-2").mkdir(exist_ok=True)
        write_tsv(root / "SST-2" / f"{split}.tsv", ["sentence", "label"],
                  [[row["sentence"], row["label"]] for row in sentiment_rows(32, seed)])
        (root / "MRPC").mkdir(exist_ok=True)
        write_tsv(root / "MRPC" / f"{split}.tsv", ["Quality", "#1 String", "#2 String"],
                  [[label, a, b] for a, b, label in _pairs(32, seed)])
        (root / "STS-B").mkdir(exist_ok=True)
        write_tsv(root / "STS-B" / f"{split}.tsv", ["sentence1", "sentence2", "score"],
                  [[a, b, 5.0 * label] for a, b, label in _pairs(32, seed + 10)])
    (root / "SQuAD").mkdir()
    for split in ("train", "dev"):
        _squad_file(root / "SQuAD" / f"{split}-v1.1.json")
    (root / "RTE").mkdir()  # a task folder without its training file: not present
    return root


def _metrics(out: Path, row: str, task: str) -> dict:
    return json.loads((out / row / task / "metrics.json").read_text())


@pytest.mark.slow
def test_the_table_runs_every_present_task_and_resumes_task_by_task(glue, tmp_path, capsys):
    model = make_tiny_model(tmp_path / "bert", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    out = tmp_path / "table"
    args = ["--model", f"BERT={model}", "--modes", "earlybert,dense", "--data-dir", str(glue),
            "--output-dir", str(out), *SETTINGS]
    assert main(args) == 0
    table = json.loads((out / "table.json").read_text())
    assert table["tasks"] == ["sst2", "mrpc", "stsb", "squad"]  # RTE/ has no train.tsv
    assert table["metrics"] == {"sst2": "accuracy", "mrpc": "accuracy", "stsb": "spearman", "squad": "f1"}
    assert table["reference"] == "BERT-dense" and list(table["rows"]) == ["BERT-dense", "BERT-earlybert"]
    for name, row in table["rows"].items():
        metrics = {task: _metrics(out, name, task) for task in table["tasks"]}
        assert {m["mode"] for m in metrics.values()} == {row["mode"]}
        expected = {"sst2": metrics["sst2"]["scores"]["validation"]["accuracy"],
                    "mrpc": metrics["mrpc"]["scores"]["validation"]["accuracy"],
                    "stsb": metrics["stsb"]["scores"]["validation"]["spearman"],
                    "squad": metrics["squad"]["scores"]["validation"]["f1"]}
        assert row["scores"] == expected
        assert row["average"] == pytest.approx(sum(expected.values()) / 4)
        dense = {task: _metrics(out, "BERT-dense", task)["time"]["total_seconds"] for task in table["tasks"]}
        saved = [1 - metrics[task]["time"]["total_seconds"] / dense[task] for task in table["tasks"]]
        assert row["time_saved"] == pytest.approx({"mean": sum(saved) / 4, "min": min(saved), "max": max(saved)})
    assert table["rows"]["BERT-dense"]["time_saved"]["mean"] == 0.0
    printed = capsys.readouterr().out
    assert printed.startswith(format_table(table)) and (out / "table.txt").read_text() == format_table(table) + "\n"
    assert "SQUAD (f1)" in printed.splitlines()[0]

    # A second call reads the finished runs; a run lost since is run again, the others are left as they were.
    kept = {task: (out / "BERT-earlybert" / task / "metrics.json").read_bytes() for task in ("sst2", "mrpc", "stsb")}
    shutil.rmtree(out / "BERT-earlybert" / "squad")
    assert main(args) == 0
    assert all((out / "BERT-earlybert" / task / "metrics.json").read_bytes() == kept[task] for task in kept)
    assert _metrics(out, "BERT-earlybert", "squad")["mode"] == "earlybert"


def test_bad_arguments_one_line(glue, tmp_path, capsys):
    for args, message in (
        (["--model", "nofolder", "--data-dir", str(glue)], "--model: expected NAME=FOLDER"),
        (["--model", f"A={tmp_path / 'missing'}", "--data-dir", str(glue)], "is not a folder"),
        (["--model", f"A={tmp_path}", "--modes", "dense,sparse", "--data-dir", str(glue)], "unknown mode 'sparse'"),
        (["--model", f"A={tmp_path}", "--data-dir", str(tmp_path)], "holds no task folder with a training file"),
    ):
        assert main([*args, "--output-dir", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()
