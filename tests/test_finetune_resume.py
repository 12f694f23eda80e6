"""Fine-tuning on the one backend gains what pre-training had: one run per folder, --resume from checkpoints of the
search and of the fine-tuning (SIGKILL mid-search and mid-fine-tuning -> the same weights and scores), with BERT's
dropout on: a resumed stage opens its DataLoader iterators at another step than the uninterrupted run, and their
base-seed draws must not shift the dropout masks."""

import json
import re
import signal
from pathlib import Path

import pytest
import torch
from finetune_fixtures import make_tiny_model, sentiment_rows, write_jsonl
from safetensors.torch import load_file
from test_pretrain import run_cli as run_process


def run_cli(args: list[str], kill_on: str | None = None) -> tuple[int, str]:
    return run_process(args, kill_on, module="earlybert_pretrain.finetune.cli")


def earlybert_run_args(folder: Path) -> list[str]:
    """An EarlyBERT SST-2 run on a tiny model with BERT's dropout: 64 examples in batches of 16 (4 steps an epoch),
    6 search steps, 2 epochs (8 steps) with scores after each, checkpoints every 3 steps (mid-epoch)."""
    model = make_tiny_model(folder / "model", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    train = write_jsonl(folder / "train.jsonl", sentiment_rows(64, 0))
    dev = write_jsonl(folder / "dev.jsonl", sentiment_rows(32, 1))
    return ["--task", "sst2", "--model", str(model), "--mode", "earlybert", f"data.train_file={train}",
            f"data.validation_files=[{dev}]", "batch_size=16", "lr=1e-3", "search.steps=6", "search.record_every=2",
            "search.heads_to_prune=1", "precision=fp32", "checkpoint_every=3", "log_every=1"]


def assert_same_run(expected_folder: Path, got_folder: Path) -> None:
    """The same ticket, losses, scores per epoch and final weights, bit for bit."""
    expected, got = (json.loads((folder / "metrics.json").read_text()) for folder in (expected_folder, got_folder))
    assert got["ticket"]["digest"] == expected["ticket"]["digest"]
    assert got["losses"] == expected["losses"] and got["epochs"] == expected["epochs"]
    weights = [load_file(str(folder / "model" / "model.safetensors")) for folder in (expected_folder, got_folder)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


@pytest.mark.slow
def test_sigkill_mid_search_and_mid_finetuning_resumes_to_the_same_run(tmp_path):
    common = earlybert_run_args(tmp_path)
    reference = tmp_path / "reference"
    code, log = run_cli([*common, f"output_dir={reference}"])
    assert code == 0, log[-3000:]
    # Progress as pre-training shows it: every step of both stages with loss, lr, throughput, ETA; scores per epoch.
    line = r"(search|finetune) step (\d+)/(\d+)  loss [\d.]+.*lr [\d.e-]+  [\d.]+ seq/s  ETA \d+m\d\ds"
    progress = re.findall(line, log)
    assert progress == [("search", str(i), "6") for i in range(1, 7)] + [("finetune", str(i), "8") for i in range(1, 9)]
    assert re.search(r"epoch 1 \(step \d+/8\): \{", log), log[-3000:]
    code, log = run_cli([*common, f"output_dir={reference}"])
    assert code == 2 and "holds another fine-tuning run; pass --resume" in log

    out = tmp_path / "run"
    # An epoch is 4 steps: the search resumes mid-epoch at step 3, fine-tuning mid-epoch at 6, after epoch 1's scores.
    code, log = run_cli([*common, f"output_dir={out}", "--resume"], kill_on=r"search step 5/6")
    assert code == -signal.SIGKILL, log[-3000:]
    code, log = run_cli([*common, f"output_dir={out}", "--resume"], kill_on=r"finetune step 7/8")
    assert code == -signal.SIGKILL and "search: resumed at step 3 of 6" in log, log[-3000:]
    code, log = run_cli([*common, f"output_dir={out}", "--resume"])
    assert code == 0, log[-3000:]
    assert "search" not in re.findall(r"(\w+): resumed at step", log) and "finetune: resumed at step 6 of 8" in log
    assert_same_run(reference, out)
    code, log = run_cli([*common, f"output_dir={out}", "--resume"])  # finished: nothing left to do
    assert code == 0 and "step" not in re.sub(r"steps", "", log.split("metrics in")[0].split("\n")[-1])
