"""Loss baselines (as torchtitan keeps them): a tiny EarlyBERT pre-training run and a tiny EarlyBERT fine-tuning run,
fp32 on the CPU with fixed seeds and one thread, must reproduce the committed per-step losses and ticket digests.

A change that alters training on purpose regenerates them in the same commit and says why:
    EARLYBERT_RECORD_BASELINES=1 python -m pytest tests/test_loss_baselines.py    (records; those tests skip)
    python -m pytest tests/test_loss_baselines.py                                 (checks what was recorded)
"""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from finetune_fixtures import make_tiny_model, sentiment_rows, write_jsonl
from test_pretrain import tiny_recipe

from earlybert_pretrain.finetune import cli as finetune_cli
from earlybert_pretrain.pretrain import cli as pretrain

pytest_plugins = ["data_fixtures"]
BASELINES = Path(__file__).resolve().parent / "baselines"
RECORD = os.environ.get("EARLYBERT_RECORD_BASELINES") == "1"


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions in matmuls may split differently with more threads
    yield
    torch.set_num_threads(threads)


def check_or_record(name: str, observed: dict, folder: Path = BASELINES, record: bool = RECORD) -> None:
    """Compare with the committed baseline, or (recording) write it and skip: a run that records checks nothing,
    so a baseline is only ever checked against a file an earlier run wrote."""
    path = folder / f"{name}.json"
    if record:
        folder.mkdir(exist_ok=True)
        path.write_text(json.dumps(observed, indent=1) + "\n")
        pytest.skip(f"recorded {path}; not checked in the run that wrote it (run again without "
                    "EARLYBERT_RECORD_BASELINES to check)")
    expected = json.loads(path.read_text())
    assert observed == expected, f"{name}: the run no longer reproduces {path}"


def test_recording_a_baseline_never_checks_it(tmp_path):
    with pytest.raises(pytest.skip.Exception, match="not checked in the run that wrote it"):
        check_or_record("probe", {"losses": [1.0]}, folder=tmp_path, record=True)
    assert json.loads((tmp_path / "probe.json").read_text()) == {"losses": [1.0]}
    check_or_record("probe", {"losses": [1.0]}, folder=tmp_path, record=False)
    with pytest.raises(AssertionError, match="no longer reproduces"):
        check_or_record("probe", {"losses": [1.5]}, folder=tmp_path, record=False)


@pytest.mark.slow
def test_pretraining_reproduces_its_loss_baseline(wiki_build, single_process_dist, one_thread, tmp_path):
    recipe = tiny_recipe(wiki_build.shards)
    recipe.update(total_steps=20, search={"steps": 4, "heads_to_prune": 1, "ffn_ratio": 0.3, "record_every": 2})
    recipe["engine"]["checkpoint_every"] = 100
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert pretrain.main(["--config", str(config), f"output_dir={out}"]) == 0
    progress = json.loads((out / "progress.json").read_text())
    check_or_record("pretrain_tiny", {
        "losses": {stage: progress[stage]["losses"] for stage in ("search", "phase1", "phase2")},
        "ticket_digest": progress["draw"]["digest"]})


def test_finetuning_reproduces_its_loss_baseline(one_thread, tmp_path):
    model = make_tiny_model(tmp_path / "model")
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(64, 0))
    dev = write_jsonl(tmp_path / "dev.jsonl", sentiment_rows(32, 1))
    out = tmp_path / "run"
    assert finetune_cli.main([
        "--task", "sst2", "--model", str(model), "--mode", "earlybert", f"data.train_file={train}",
        f"data.validation_files=[{dev}]", "batch_size=16", "eval_batch_size=32", "lr=1e-3", "search.steps=6",
        "search.record_every=2", "search.heads_to_prune=1", "precision=fp32", f"output_dir={out}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    check_or_record("finetune_tiny", {"losses": metrics["losses"], "ticket_digest": metrics["ticket"]["digest"],
                                      "scores": metrics["scores"]})
