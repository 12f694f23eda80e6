"""The stage runner end to end on the real Wikipedia sample: one rank in-process, SIGKILL + resume, two ranks."""

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from earlybert_pretrain.model.bert import BertConfig, BertForPreTraining, parameter_counts
from earlybert_pretrain.model.hf import load_pretrained, read_config
from earlybert_pretrain.pretrain import cli as pretrain
from earlybert_pretrain.tickets.ticket import Ticket
from earlybert_pretrain.train.stage import parameter_digest

pytest_plugins = ["data_fixtures"]
ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def tiny_recipe(shard_dir: Path) -> dict:
    """Seq 32 / 64, batch 8 / 4 in micro-batches of 4 / 2 (accumulation 2); NVIDIA's split of 40 steps is 33 + 7,
    80% of it 26 + 6 pruned steps."""
    vocab_size = json.loads((shard_dir / "manifest.json").read_text())["vocab"]["size"]
    return {
        "model": {"vocab_size": vocab_size, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "intermediate_size": 64, "max_position_embeddings": 64},
        "mode": "earlybert", "total_steps": 40, "preset": "nvidia",
        "phase1": {"seq_len": 32, "global_batch_size": 8, "micro_batch_size": 4, "lr": 0.03, "max_predictions": 5},
        "phase2": {"seq_len": 64, "global_batch_size": 4, "micro_batch_size": 2, "lr": 0.02, "max_predictions": 10},
        "search": {"steps": 6, "heads_to_prune": 1, "ffn_ratio": 0.3, "record_every": 2},
        "data": {"shard_dir": str(shard_dir)},
        "engine": {"precision": "fp32", "checkpoint_every": 3, "keep_checkpoints": 2, "log_every": 1},
    }


@pytest.fixture(scope="module")
def recipe(wiki_build, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(wiki_build.shards)))
    return path


@pytest.fixture(scope="module")
def reference(recipe, single_process_dist, tmp_path_factory):
    """One uninterrupted single-rank run, in-process."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert pretrain.main(["--config", str(recipe), f"output_dir={out}"]) == 0
    return out


def subprocess_env() -> dict:
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_ENV}
    env.update(PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")
    return env


def run_cli(args: list[str], kill_on: str | None = None,
            module: str = "earlybert_pretrain.pretrain") -> tuple[int, str]:
    """Run a CLI module in a fresh process; SIGKILL it as soon as a log line matches ``kill_on``."""
    process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT,
                               env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if kill_on and re.search(kill_on, line):
            process.send_signal(signal.SIGKILL)
            break
    process.stdout.close()
    return process.wait(timeout=300), "".join(lines)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final_model" / "model.safetensors"))


@pytest.mark.slow
def test_one_rank_end_to_end(reference, recipe):
    out = reference
    for name in ("run.json", "progress.json", "timing.json", "report.json", "report.txt", "ticket.json",
                 "ticket_report.json", "theta0/model.safetensors", "search/mask_history.json", "search/heatmap.png",
                 "phase1_model/model.safetensors", "final_model/config.json", "final_model/model.safetensors",
                 "final_model/vocab.txt", "final_model/ticket.json", "checkpoints/latest"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    progress = json.loads((out / "progress.json").read_text())
    assert set(progress) == {"search", "draw", "phase1", "phase2"}
    assert [progress[s]["steps"] for s in ("search", "phase1", "phase2")] == [6, 26, 6]
    timing = json.loads((out / "timing.json").read_text())
    assert timing["phase1"]["steps"] == 26 and timing["phase1"]["total_seconds"] > 0
    assert timing["phase1"]["runtime"]["gradient_accumulation_steps"] == 2

    losses = progress["search"]["losses"] + progress["phase1"]["losses"] + progress["phase2"]["losses"]
    assert all(math.isfinite(loss) for loss in losses)
    phase1 = progress["phase1"]["losses"]
    assert sum(phase1[-5:]) / 5 < sum(phase1[:5]) / 5 - 0.2, phase1
    assert progress["phase2"]["losses"][-1] < progress["search"]["losses"][0] - 0.2

    ticket = Ticket.load(out / "ticket.json")
    assert Ticket.load(out / "final_model" / "ticket.json").digest() == ticket.digest() == progress["draw"]["digest"]
    assert ticket.step == 6 and [len(h) for h in ticket.heads_kept] == [3, 3]
    model_config = BertConfig(**yaml.safe_load(recipe.read_text())["model"])
    pruned_total = parameter_counts(ticket.pruned_config(model_config))["total"]
    search, phase1, phase2 = (progress[name] for name in ("search", "phase1", "phase2"))
    assert search["parameters"] > pruned_total  # the search trains the dense model with its coefficients
    for record in (phase1, phase2):  # the re-initialised engines really hold the smaller model
        assert record["parameters"] == record["optimizer_parameters"] == pruned_total
    assert read_config(out / "phase1_model").ffn_per_layer == [len(kept) for kept in ticket.ffn_kept]

    # final_model/ holds exactly the weights phase 2 ended with (the digest every rank reported), in fp32.
    reloaded = load_pretrained(BertForPreTraining, out / "final_model").eval()
    assert parameter_digest(reloaded) == phase2["parameter_digests_by_rank"][0]
    assert {tensor.dtype for tensor in final_weights(out).values()} == {torch.float32}

    report = json.loads((out / "report.json").read_text())
    assert set(report["stages"]) == {"search", "draw", "phase1", "phase2"}
    text = (out / "report.txt").read_text()
    assert [line.split()[0] for line in text.splitlines()[2:5]] == ["search", "phase1", "phase2"]
    assert report["ticket"]["digest"] == ticket.digest() and report["heatmap"].endswith("heatmap.png")
    assert report["total_seconds"] == pytest.approx(sum(entry["total_seconds"] for entry in timing.values()
                                                        if "total_seconds" in entry))


@pytest.mark.slow
def test_sigkill_anywhere_resumes_bit_identically(reference, recipe, tmp_path):
    """Dropout on (BERT's 0.1), four data workers, accumulation 2: killed mid-search, right after the draw,
    mid-phase 1, at the phase boundary and mid-phase 2, the run ends with the uninterrupted run's weights."""
    out = tmp_path / "run"
    args = ["--config", str(recipe), f"output_dir={out}", "--resume"]
    kills = [(r"search step 5/6", None),  # checkpoint at step 3 is on disk
             (r"phase1: [\d,]+ parameters", "search: resumed at step 3 of 6"),  # after the draw, before phase 1
             (r"phase1 step 5/26", None),  # phase 1's checkpoint at step 3 is on disk
             (r"phase2: [\d,]+ parameters", "phase1: resumed at step 3 of 26"),  # phase 1 done, phase 2 not begun
             (r"phase2 step 4/6", None)]  # phase 2's checkpoint at step 3 is on disk
    for kill_on, resumed in kills:
        code, log = run_cli(args, kill_on=kill_on)
        assert code == -signal.SIGKILL, f"the run ended ({code}) before the kill point {kill_on!r}:\n{log[-3000:]}"
        assert resumed is None or resumed in log, log[-3000:]
    code, log = run_cli(args)
    assert code == 0, log[-3000:]
    assert "phase2: resumed at step 3 of 6" in log
    expected, got = final_weights(reference), final_weights(out)
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name
    assert json.loads((out / "progress.json").read_text())["draw"]["digest"] == Ticket.load(
        reference / "ticket.json").digest()


@pytest.mark.slow
def test_a_bf16_run_killed_mid_search_and_mid_phase2_resumes_to_its_uninterrupted_twin(recipe, tmp_path):
    """bf16 autocast over fp32 parameters: the fp32 weights, LAMB moments and RNG states in the checkpoints make
    the resumed run the same computation as the uninterrupted one, bit for bit."""
    args = ["--config", str(recipe), "engine.precision=bf16"]
    code, log = run_cli([*args, f"output_dir={tmp_path / 'twin'}"])
    assert code == 0, log[-3000:]
    assert "bf16 autocast over fp32 parameters" in log
    resumed = [*args, f"output_dir={tmp_path / 'run'}", "--resume"]
    for kill_on in (r"search step 5/6", r"phase2 step 4/6"):
        code, log = run_cli(resumed, kill_on=kill_on)
        assert code == -signal.SIGKILL, f"the run ended ({code}) before the kill point {kill_on!r}:\n{log[-3000:]}"
    code, log = run_cli(resumed)
    assert code == 0 and "phase2: resumed at step 3 of 6" in log, log[-3000:]
    expected, got = final_weights(tmp_path / "twin"), final_weights(tmp_path / "run")
    assert expected.keys() == got.keys() and all(tensor.dtype == torch.float32 for tensor in got.values())
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_through_the_deepspeed_launcher(recipe, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_accelerators", "2", "--master_port",
               str(free_port()), "--module", "earlybert_pretrain.pretrain", "--config", str(recipe),
               f"output_dir={out}", "total_steps=20", "search.steps=4"]
    result = subprocess.run(command, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    progress = json.loads((out / "progress.json").read_text())
    digests = progress["draw"]["digests_by_rank"]
    assert len(digests) == 2 and digests[0] == digests[1] == Ticket.load(out / "ticket.json").digest()
    for stage in ("search", "phase1", "phase2"):
        by_rank = progress[stage]["parameter_digests_by_rank"]
        assert len(by_rank) == 2 and by_rank[0] == by_rank[1], stage
        first = progress[stage]["first_samples_by_rank"]
        assert not set(first[0]) & set(first[1]), stage
        micro = 4 if stage != "phase2" else 2
        assert sorted(first[0] + first[1]) == list(range(2 * micro)), stage
    assert progress["phase1"]["timing"]["runtime"]["world_size"] == 2
    assert progress["phase1"]["timing"]["runtime"]["gradient_accumulation_steps"] == 1


def expect_error(capsys, argv: list[str], message: str) -> None:
    assert pretrain.main(argv) == 2
    error = capsys.readouterr().err
    assert re.search(message, error), error


def test_bad_input_is_one_clear_error(reference, recipe, tmp_path, capsys):
    out = reference
    base = ["--config", str(recipe)]
    expect_error(capsys, [*base, f"output_dir={out}"],
                 r"holds another pre-training run; pass --resume .* or --overwrite")
    expect_error(capsys, [*base, f"output_dir={out}", "--resume", "phase1.lr=0.5"],
                 r"different config \(phase1.lr differ")
    expect_error(capsys, [*base, f"output_dir={tmp_path / 'a'}", "phase1.lrr=1"], r"did you mean 'lr'")
    expect_error(capsys, [*base, f"output_dir={tmp_path / 'b'}", "phase1.global_batch_size=10"],
                 r"global batch \(10, phase\*\.global_batch_size\).*micro-batch \(4")
    expect_error(capsys, [*base, f"output_dir={tmp_path / 'c'}", "model.vocab_size=1234"],
                 r"manifest.json: shards use a vocab of \d+ tokens but the model has 1234")
    expect_error(capsys, [*base, f"output_dir={tmp_path / 'd'}", "phase2.seq_len=128"],
                 r"phase2.seq_len=128 exceeds model.max_position_embeddings=64")
    expect_error(capsys, [*base, f"output_dir={tmp_path / 'e'}", "mode=ticket", f"ticket={out / 'ticket.json'}",
                          "model.num_hidden_layers=3"], r"drawn for num_hidden_layers=2")
    expect_error(capsys, [*base, f"output_dir={tmp_path / 'f'}", "mode=fast"], r"mode: expected one of 'earlybert'")
    expect_error(capsys, [*base, f"output_dir={tmp_path / 'h'}", "engine.precision=fp16"],
                 r"does not support fp16; use engine.precision=bf16")
    expect_error(capsys, [*base, f"output_dir={tmp_path / 'g'}", "--compare-to", str(tmp_path)],
                 r"--compare-to .*no report.json")
    assert not any((tmp_path / name).exists() for name in "abcdfgh")  # refused before anything was written

    # A folder that is not a run is never deleted, not even with --overwrite; its files are named.
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "plan.txt").write_text("keep me")
    expect_error(capsys, [*base, f"output_dir={notes}", "--overwrite"], r"not a pre-training run \(plan.txt\)")
    assert sorted(p.name for p in notes.iterdir()) == ["plan.txt"] and (notes / "plan.txt").read_text() == "keep me"


@pytest.mark.slow
def test_dense_random_and_early_bird_modes_with_comparison(recipe, single_process_dist, tmp_path):
    base = ["--config", str(recipe), "total_steps=10"]
    dense, random_run, early = tmp_path / "dense", tmp_path / "random", tmp_path / "early"
    assert pretrain.main([*base, "mode=dense", f"output_dir={dense}"]) == 0
    progress = json.loads((dense / "progress.json").read_text())
    assert set(progress) == {"phase1", "phase2"} and [progress[p]["steps"] for p in ("phase1", "phase2")] == [8, 2]
    model_config = BertConfig(**yaml.safe_load(recipe.read_text())["model"])
    assert progress["phase1"]["parameters"] == parameter_counts(model_config)["total"]
    assert not (dense / "ticket.json").exists() and not (dense / "final_model" / "ticket.json").exists()

    assert pretrain.main([*base, "mode=random", f"output_dir={random_run}"]) == 0
    progress = json.loads((random_run / "progress.json").read_text())
    assert set(progress) == {"phase1", "phase2"} and [progress[p]["steps"] for p in ("phase1", "phase2")] == [6, 2]
    assert Ticket.load(random_run / "final_model" / "ticket.json").method == "random"

    assert pretrain.main([*base, f"output_dir={early}", "search.stop=early-bird", "search.early_bird_window=2",
                          "search.early_bird_eps=1.0", "search.record_every=1", "reinit=random",
                          "--compare-to", str(dense)]) == 0
    progress = json.loads((early / "progress.json").read_text())
    assert progress["search"]["steps"] == 2 and progress["search"]["stopped_early"]  # fired at the 2nd record
    assert progress["search"]["early_bird_update"] == 1 and Ticket.load(early / "ticket.json").step == 2
    report, dense_report = (json.loads((run / "report.json").read_text()) for run in (early, dense))
    compare = report["compare_to"]
    assert compare["time_ratio"] == pytest.approx(report["total_seconds"] / dense_report["total_seconds"])
    assert compare["step_time_ratio"]["phase1"] == pytest.approx(
        report["stages"]["phase1"]["mean_step_seconds"] / dense_report["stages"]["phase1"]["mean_step_seconds"])
    assert "vs dense run" in (early / "report.txt").read_text()
