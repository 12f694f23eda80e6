"""BERT-Reduced (paper Table 7, Appendix A) in pre-training and fine-tuning: the dense step count that matches a
finished EarlyBERT run's time or FLOPs (synthetic run folders for the arithmetic), one tiny end-to-end reduced run of
each recipe whose schedule decays over the reduced steps, and the bad inputs."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import pytest
import yaml
from finetune_fixtures import TINY_CONFIG, make_tiny_model, sentiment_rows, write_jsonl
from test_pretrain import tiny_recipe

from earlybert_pretrain.config import PretrainConfig, build_dataclass, config_to_dict
from earlybert_pretrain.errors import RunError
from earlybert_pretrain.finetune import reduced as ft_reduced
from earlybert_pretrain.finetune.cli import main as ft_main
from earlybert_pretrain.model.bert import BertConfig, flops_per_token
from earlybert_pretrain.pretrain import cli as pretrain
from earlybert_pretrain.pretrain.reduced import cost_of, match_flops, match_time, split_steps, steps_for_budget
from earlybert_pretrain.tickets.draw import random_ticket

pytest_plugins = ["data_fixtures"]
PAPER = 0.9  # the paper preset's share of phase 1


def write_run(folder: Path, mode: str, stages: dict[str, tuple[int, float]], **extra) -> Path:
    """A finished run as the reports read it: report.json (steps, seconds per stage) and progress.json."""
    folder.mkdir(parents=True)
    progress = {name: {"steps": steps, "losses": [5.0] * steps,
                       "timing": {"total_seconds": seconds, "mean_step_seconds": seconds / steps, "tokens": 1}}
                for name, (steps, seconds) in stages.items()}
    report = {"mode": mode, "total_seconds": sum(seconds for _, seconds in stages.values()), **extra,
              "stages": {name: {"steps": entry["steps"], "seconds": entry["timing"]["total_seconds"],
                                "mean_step_seconds": entry["timing"]["mean_step_seconds"], "final_loss": 5.0}
                         for name, entry in progress.items()}}
    (folder / "report.json").write_text(json.dumps(report))
    (folder / "progress.json").write_text(json.dumps(progress))
    return folder


@pytest.mark.parametrize("target", [11.0, 123.4, 1000.0, 7.7])
def test_time_match_is_within_one_step(tmp_path: Path, target: float) -> None:
    dense = write_run(tmp_path / "dense", "dense", {"phase1": (90, 90.0), "phase2": (10, 20.0)})  # 1 s, 2 s a step
    early = write_run(tmp_path / "early", "earlybert", {"search": (4, target / 4), "phase1": (4, target / 2),
                                                         "phase2": (2, target / 4)})
    match = match_time(early, [dense], PAPER)
    assert match.target == pytest.approx(target) and match.per_step == {"phase1": 1.0, "phase2": 2.0}
    assert match.steps == split_steps(match.total_steps, PAPER)
    continuous = target / (PAPER * 1.0 + (1 - PAPER) * 2.0)
    assert abs(match.total_steps - continuous) <= 1.0
    # No neighbouring count gets closer to the EarlyBERT run's time.
    for total in (match.total_steps - 1, match.total_steps + 1):
        assert abs(cost_of(split_steps(total, PAPER), match.per_step) - target) >= abs(match.cost - target)
    if target == 11.0:
        assert match.steps == {"phase1": 9, "phase2": 1} and match.cost == 11.0
        assert match_time(early, [early, dense], PAPER) == match  # the first dense run of --compare-to


def test_time_match_falls_back_to_the_dense_run_the_earlybert_run_was_compared_to(tmp_path: Path) -> None:
    dense = write_run(tmp_path / "dense", "dense", {"phase1": (9, 9.0), "phase2": (1, 2.0)})
    early = write_run(tmp_path / "early", "earlybert", {"phase1": (4, 20.0), "phase2": (1, 2.0)},
                      compare_to={"dense_run": str(dense)})
    assert match_time(early, [], PAPER).steps == {"phase1": 18, "phase2": 2}  # 22 s at 1.1 s a step


def test_flops_match_counts_the_search_dense_and_the_phases_pruned(tmp_path: Path) -> None:
    cfg = build_dataclass(PretrainConfig, {
        "model": {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "intermediate_size": 64, "max_position_embeddings": 64},
        "phase1": {"seq_len": 32, "global_batch_size": 8}, "phase2": {"seq_len": 64, "global_batch_size": 4}})
    early = write_run(tmp_path / "early", "earlybert", {"search": (6, 1.0), "phase1": (26, 1.0),
                                                         "phase2": (6, 1.0)})
    (early / "run.json").write_text(json.dumps({"config": config_to_dict(cfg)}))
    ticket = random_ticket(cfg.model, 2, 0.5, "global", seed=0, ffn_multiple_of=1)
    ticket.save(early / "ticket.json")
    pruned = ticket.pruned_config(cfg.model)
    per_token = {"dense": {s: flops_per_token(cfg.model, s) for s in (32, 64)},
                 "pruned": {s: flops_per_token(pruned, s) for s in (32, 64)}}
    expected = (6 * 8 * 32 * per_token["dense"][32] + 26 * 8 * 32 * per_token["pruned"][32]
                + 6 * 4 * 64 * per_token["pruned"][64])
    match = match_flops(early, cfg, PAPER)
    assert match.matched == "flops" and match.target == pytest.approx(expected)
    dense_step = {"phase1": 8 * 32 * per_token["dense"][32], "phase2": 4 * 64 * per_token["dense"][64]}
    assert match.per_step == pytest.approx(dense_step)
    continuous = expected / (PAPER * dense_step["phase1"] + (1 - PAPER) * dense_step["phase2"])
    assert abs(match.total_steps - continuous) <= 1.0 and match.total_steps < 26 + 6 + 6  # fewer than EarlyBERT's
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hidden_size=64, heads_per_layer=[],
                                                               ffn_per_layer=[]))
    with pytest.raises(RunError, match=r"--match-flops .*model differs .*hidden_size"):
        match_flops(early, other, PAPER)


def test_a_budget_too_small_for_both_phases_is_refused() -> None:
    with pytest.raises(RunError, match=r"mode=reduced: .*too few for both phases"):
        steps_for_budget(2.0, {"phase1": 1.0, "phase2": 1.0}, PAPER)  # 2 or 3 steps split 9:1 leave phase 2 none
    assert steps_for_budget(10.0, {"phase1": 1.0, "phase2": 1.0}, PAPER) == {"phase1": 9, "phase2": 1}


def expect_error(capsys, argv: list[str], pattern: str) -> None:
    assert pretrain.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert re.search(pattern, err), err


def test_bad_inputs_are_one_line(tmp_path: Path, capsys) -> None:
    dense = write_run(tmp_path / "dense", "dense", {"phase1": (9, 9.0), "phase2": (1, 2.0)})
    early = write_run(tmp_path / "early", "earlybert", {"phase1": (4, 20.0), "phase2": (1, 2.0)})
    (tmp_path / "unfinished").mkdir()
    base = [f"output_dir={tmp_path / 'out'}", "data.shard_dir=/nonexistent"]
    expect_error(capsys, [*base, "mode=dense", "--match-time", str(early)], r"--match-time: only with mode=reduced")
    expect_error(capsys, [*base, "mode=reduced"], r"mode=reduced: give one of --match-time .* or --match-flops")
    expect_error(capsys, [*base, "mode=reduced", "--match-time", str(tmp_path / "missing")],
                 r"--match-time .*missing: no such run folder")
    expect_error(capsys, [*base, "mode=reduced", "--match-flops", str(tmp_path / "unfinished")],
                 r"--match-flops .*unfinished: no report.json there")
    expect_error(capsys, [*base, "mode=reduced", "--match-time", str(dense)], r"--match-time .*a 'dense' run")
    expect_error(capsys, [*base, "mode=reduced", "--match-time", str(early)], r"pass --compare-to DENSE_RUN")
    expect_error(capsys, [*base, "mode=reduced", "--match-time", str(early), "--compare-to", str(early)],
                 r"--compare-to .*early: a 'earlybert' run; the per-step times must be a dense run's")
    expect_error(capsys, [*base, "mode=reduced", "--match-flops", str(early)], r"--match-flops .*run.json")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_reduced_run_end_to_end(wiki_build, single_process_dist, tmp_path: Path, caplog) -> None:
    recipe = {**tiny_recipe(wiki_build.shards), "preset": "paper", "mode": "reduced",
              "output_dir": str(tmp_path / "reduced")}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    dense = write_run(tmp_path / "dense", "dense", {"phase1": (36, 36.0), "phase2": (4, 8.0)})  # 1 s, 2 s a step
    early = write_run(tmp_path / "early", "earlybert", {"search": (6, 3.0), "draw": (1, 0.5), "phase1": (26, 6.0),
                                                         "phase2": (3, 1.5)})  # 11 s: 10 dense steps
    with caplog.at_level(logging.INFO, logger="earlybert_pretrain"):
        assert pretrain.main(["--config", str(tmp_path / "tiny.yaml"), "--match-time", str(early),
                              "--compare-to", str(dense)]) == 0
    out = tmp_path / "reduced"
    progress = json.loads((out / "progress.json").read_text())
    assert set(progress) == {"phase1", "phase2"} and [progress[p]["steps"] for p in ("phase1", "phase2")] == [9, 1]
    assert json.loads((out / "run.json").read_text())["config"]["total_steps"] == 10
    # Each phase's schedule decays over the reduced steps: the last step runs at the final lr (0), not before.
    lrs = {(record.args[0], record.args[1]): record.args[5] for record in caplog.records
           if isinstance(record.args, tuple) and "step %d/%d" in str(record.msg)}
    assert lrs[("phase1", 9)] == 0.0 and lrs[("phase1", 8)] > 0.0 and lrs[("phase2", 1)] == 0.0
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "reduced" and report["reduced"]["matched"] == "time"
    assert report["reduced"]["steps"] == {"phase1": 9, "phase2": 1} and report["reduced"]["target"] == 11.0
    assert report["compare_to"]["dense_run"] == str(dense)
    assert [row["mode"] for row in report["side_by_side"]] == ["reduced", "dense", "earlybert"]
    text = (out / "report.txt").read_text()
    assert "reduced: 9 + 1 steps match the time of" in text and "side by side" in text


# ---- fine-tuning


def write_metrics(folder: Path, mode: str, total_seconds: float, finetune_steps: int, mean_step: float,
                  search_steps: int = 0, **extra) -> Path:
    """A finished fine-tuning run as the matching reads it: metrics.json's time, geometry and config."""
    folder.mkdir(parents=True)
    time = {"total_seconds": total_seconds, "finetune": {"steps": finetune_steps, "mean_step_seconds": mean_step}}
    if search_steps:
        time["search"] = {"steps": search_steps}
    metrics = {"mode": mode, "task": "sst2", "time": time, **extra}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_finetune_time_match_is_the_nearest_step(tmp_path: Path) -> None:
    dense = write_metrics(tmp_path / "dense", "dense", 12.0, 12, 1.0)
    early = write_metrics(tmp_path / "early", "earlybert", 7.4, 8, 0.6, search_steps=10)
    dense_time = {**json.loads((dense / "metrics.json").read_text())["time"], "path": str(dense)}
    match = ft_reduced.match_time(str(early), dense_time, "sst2")
    assert match.steps == 7 and match.target == 7.4 and match.per_step == 1.0  # 7.4 s at 1 s a step
    assert abs(match.steps - match.target / match.per_step) <= 0.5


def test_finetune_flops_match_counts_the_search_dense_and_the_finetuning_pruned(tmp_path: Path) -> None:
    dense_model = BertConfig(**{**TINY_CONFIG, "slimming": False})
    geometry = {"heads_per_layer": [3, 3], "ffn_per_layer": [40, 32]}
    early = write_metrics(tmp_path / "early", "earlybert", 1.0, 8, 0.1, search_steps=10, model_geometry=geometry,
                          config={"batch_size": 16, "search": {"objective": "task"}})
    pruned = dataclasses.replace(dense_model, **geometry)
    expected = 16 * 128 * (10 * flops_per_token(dense_model, 128, 0.0) + 8 * flops_per_token(pruned, 128, 0.0))
    match = ft_reduced.match_flops(str(early / "metrics.json"), "sst2", dense_model, 16, 128)
    assert match.target == pytest.approx(expected)
    assert match.per_step == pytest.approx(16 * 128 * flops_per_token(dense_model, 128, 0.0))
    assert match.steps == round(expected / match.per_step) and match.steps < 18


def test_finetune_bad_inputs_are_one_line(tmp_path: Path, capsys) -> None:
    model = make_tiny_model(tmp_path / "model")
    dense = write_metrics(tmp_path / "dense", "dense", 12.0, 12, 1.0)
    early = write_metrics(tmp_path / "early", "earlybert", 7.4, 8, 0.6)
    (tmp_path / "unfinished").mkdir()
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(8, 0))
    base = ["--task", "sst2", "--model", str(model), f"output_dir={tmp_path / 'out'}", f"data.train_file={train}",
            f"data.validation_files=[{train}]"]
    cases = [
        (["--mode", "dense", "--match-time", str(early)], r"match_time: only with mode 'reduced'"),
        (["--mode", "reduced"], r"mode 'reduced' needs one of match_time=RUN"),
        (["--mode", "reduced", "--match-time", str(tmp_path / "missing")], r"match_time: .*missing: no such run"),
        (["--mode", "reduced", "--match-flops", str(tmp_path / "unfinished")], r"no metrics.json there"),
        (["--mode", "reduced", "--match-time", str(dense)], r"match_time: .*a 'dense' run on 'sst2'"),
        (["--mode", "reduced", "--match-time", str(early)], r"was not compared to a dense run; give dense_metrics"),
    ]
    for extra, pattern in cases:
        assert ft_main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and re.search(pattern, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_finetune_reduced_end_to_end(tmp_path: Path, caplog) -> None:
    model = make_tiny_model(tmp_path / "model")
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(64, 0))  # batch 16: 4 steps an epoch
    dense = write_metrics(tmp_path / "dense", "dense", 12.0, 12, 1.0)
    early = write_metrics(tmp_path / "early", "earlybert", 6.2, 4, 0.5, search_steps=8,
                          **{"time": {"total_seconds": 6.2, "finetune": {"steps": 4, "mean_step_seconds": 0.5},
                                      "vs_dense": {"dense_metrics": str(dense / "metrics.json")}}})
    out = tmp_path / "reduced"
    with caplog.at_level(logging.INFO, logger="earlybert_pretrain"):
        assert ft_main(["--task", "sst2", "--model", str(model), "--mode", "reduced", "--match-time", str(early),
                        f"output_dir={out}", f"data.train_file={train}", f"data.validation_files=[{train}]",
                        "batch_size=16", "log_every=1", "lr=1e-3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reduced"]["steps"] == 6 and metrics["schedule"]["steps"] == 6  # 6.2 s at the dense 1 s a step
    assert metrics["schedule"]["lr"] == 1e-3 and metrics["ticket"] is None and metrics["search"] is None
    assert metrics["model_geometry"]["heads_per_layer"] == [4, 4]  # dense
    assert metrics["time"]["vs_dense"]["dense_metrics"] == str(dense / "metrics.json")
    assert [entry["step"] for entry in metrics["epochs"]] == [4, 6]  # an epoch, then the last reduced step
    lrs = {record.args[1]: record.args[5] for record in caplog.records
           if isinstance(record.args, tuple) and "step %d/%d" in str(record.msg) and record.args[0] == "finetune"}
    assert lrs[6] == 0.0 and lrs[5] > 0.0  # linear decay reaches 0 at the last reduced step
