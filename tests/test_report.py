"""The run report's plot: the series it draws (exact steps, times and losses from the progress records) and a
report.png that reflects them (this run and the --compare-to runs); TensorBoard: every tag the README lists, read back
with its value checked (lr against the schedule, grad norm against an independent norm, mask distance against
tickets.distance.mask_distance)."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from matplotlib import image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_pretrain import tiny_recipe

from earlybert_pretrain.config import OptimizerConfig
from earlybert_pretrain.errors import RunError
from earlybert_pretrain.model.bert import BertConfig, BertForPreTraining
from earlybert_pretrain.pretrain import cli as pretrain
from earlybert_pretrain.pretrain.report import loss_series, time_to_accuracy, validation_series, write_run_report
from earlybert_pretrain.tickets.distance import mask_distance
from earlybert_pretrain.tickets.history import MaskHistory
from earlybert_pretrain.train.stage import Runtime, Schedule, Stage, StageSettings
from earlybert_pretrain.train.telemetry import TensorBoardLogger

pytest_plugins = ["data_fixtures"]  # the session-wide build of the real dump


def stage(losses: list[float], seconds: float) -> dict:
    return {"steps": len(losses), "losses": losses,
            "timing": {"total_seconds": seconds, "mean_step_seconds": seconds / max(1, len(losses)), "tokens": 10}}


def earlybert_progress(scale: float = 1.0) -> dict:
    return {"search": stage([9.0, 8.5], 4.0), "draw": {"timing": {"total_seconds": 1.0}},
            "phase1": stage([scale * 9.5, scale * 7.0, scale * 6.0], 3.0), "phase2": stage([6.5], 2.0)}


def test_series_place_every_stage_on_the_whole_schedule() -> None:
    series = loss_series(earlybert_progress())
    assert [s.stage for s in series] == ["search", "phase1", "phase2"]  # the draw trains nothing
    assert [s.steps for s in series] == [[1, 2], [3, 4, 5], [6]]
    # Sec. 4.1 time: search 4 s (2 s a step), the 1 s draw, phase 1 3 s (1 s a step), phase 2 2 s.
    assert [s.seconds for s in series] == [[2.0, 4.0], [6.0, 7.0, 8.0], [10.0]]
    assert [s.losses for s in series] == [[9.0, 8.5], [9.5, 7.0, 6.0], [6.5]]
    dense = loss_series({"phase1": stage([9.0, 8.0], 5.0), "phase2": stage([7.0], 4.0)})
    assert [(s.stage, s.steps, s.seconds) for s in dense] == [("phase1", [1, 2], [2.5, 5.0]),
                                                              ("phase2", [3], [9.0])]


def write_run(folder: Path, mode: str, progress: dict, compare_to=None) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "progress.json").write_text(json.dumps(progress))
    return write_run_report(folder, mode, progress, compare_to)


def read_png(path: Path) -> np.ndarray:
    pixels = image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    return pixels


def test_report_png_reflects_the_runs_drawn(tmp_path: Path) -> None:
    dense = write_run(tmp_path / "dense", "dense", {"phase1": stage([9.0, 8.0, 7.0], 6.0),
                                                    "phase2": stage([6.8], 2.0)})
    assert dense["plot"] == str(tmp_path / "dense" / "report.png")
    assert json.loads((tmp_path / "dense" / "report.json").read_text())["plot"] == dense["plot"]
    assert "loss curves: " + dense["plot"] in (tmp_path / "dense" / "report.txt").read_text()
    reduced = write_run(tmp_path / "reduced", "reduced", {"phase1": stage([9.0, 8.2], 4.0),
                                                          "phase2": stage([7.5], 1.0)})
    early = write_run(tmp_path / "early", "earlybert", earlybert_progress(), [tmp_path / "dense", tmp_path / "reduced"])
    other = write_run(tmp_path / "other", "earlybert", earlybert_progress(scale=0.5), [tmp_path / "dense",
                                                                                      tmp_path / "reduced"])
    alone = write_run(tmp_path / "alone", "earlybert", earlybert_progress())
    assert early["compare_to"]["dense_run"] == str(tmp_path / "dense")  # the text compares against the first run
    images = {name: read_png(Path(report["plot"]))
              for name, report in {"dense": dense, "reduced": reduced, "early": early, "other": other,
                                   "alone": alone}.items()}
    for a, b in (("early", "other"), ("early", "alone"), ("dense", "reduced")):
        assert not np.array_equal(images[a], images[b]), (a, b)  # other losses, or other runs beside it
    again = write_run(tmp_path / "again", "earlybert", earlybert_progress(), [tmp_path / "dense",
                                                                              tmp_path / "reduced"])
    assert np.array_equal(read_png(Path(again["plot"])), images["early"])  # a pure function of the records
    # Colour per run: the plot beside two other runs holds colours the lone run's plot lacks.
    colours = {name: {tuple(pixel) for pixel in np.round(images[name][..., :3].reshape(-1, 3), 2)}
               for name in ("early", "alone")}
    assert colours["early"] - colours["alone"]


def test_compare_run_without_progress_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "report.json").write_text(json.dumps({"mode": "dense", "total_seconds": 1.0}))
    with pytest.raises(RunError, match=r"dense/progress.json: run progress file not found"):
        write_run(tmp_path / "early", "earlybert", earlybert_progress(), [tmp_path / "dense"])
    assert sorted(p.name for p in (tmp_path / "early").iterdir()) == ["progress.json"]


def test_report_gives_the_optimizer_state_per_rank(tmp_path: Path) -> None:
    progress = earlybert_progress()
    progress["phase1"]["timing"]["optimizer_state_bytes"] = {"moments": 2**21, "master_weights": 2**20,
                                                             "total": 3 * 2**20}
    report = write_run(tmp_path / "run", "earlybert", progress)
    assert report["stages"]["phase1"]["optimizer_state_bytes_per_rank"] == 3 * 2**20
    assert report["stages"]["phase2"]["optimizer_state_bytes_per_rank"] is None  # a run from before it was kept
    assert "optimizer state per rank: phase1 3.00 MiB\n" in (tmp_path / "run" / "report.txt").read_text()


class TensorBoardEvents:
    """What a run's event files hold: scalars as {tag: {step: value}}, histogram and image tags with their steps."""

    def __init__(self, folder: Path):
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
        events.Reload()
        tags = events.Tags()
        self.scalars = {tag: {event.step: event.value for event in events.Scalars(tag)} for tag in tags["scalars"]}
        self.histograms = {tag: [event.step for event in events.Histograms(tag)] for tag in tags["histograms"]}
        self.images = {tag: [event.step for event in events.Images(tag)] for tag in tags["images"]}


def nvidia_poly_lr(step: int, lr: float, total: int, warmup: float) -> float:
    """NVIDIA's PolyWarmUpScheduler (power 0.5) at the n-th optimizer step, written out here independently."""
    progress = step / total
    return lr * progress / warmup if progress < warmup else lr * (1 - progress) ** 0.5


# The README's TensorBoard list (pre-training, fp32): loss, MLM, NSP, L1 (search), lr, grad norm, sequences/s,
# tokens/s, the Sec. 4.1 timing; coefficient histograms, mask distance and the heatmap of the search.
STEP_TAGS = ("loss", "mlm_loss", "nsp_loss", "lr", "grad_norm", "sequences_per_second", "tokens_per_second",
             "step_seconds", "step_wall_seconds", "data_wait_seconds")


@pytest.mark.slow
def test_every_listed_tensorboard_tag_is_written_with_its_value(wiki_build, single_process_dist, tmp_path):
    """The default configuration (fp32, ZeRO 0, dropout on, accumulation 2, data workers): each tag at every step
    it belongs to, lr equal to NVIDIA's schedule, mask distances equal to mask_distance of the recorded tickets."""
    recipe = {**tiny_recipe(wiki_build.shards), "total_steps": 10}
    recipe["search"] = {**recipe["search"], "steps": 4, "record_every": 1, "early_bird_window": 3}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert pretrain.main(["--config", str(config), f"output_dir={out}"]) == 0
    events = TensorBoardEvents(out / "tensorboard")
    progress = json.loads((out / "progress.json").read_text())
    # search: 4 steps on phase 1's schedule (8 dense steps); phases: 80% of NVIDIA's 8 + 2 steps
    stages = {"search": (4, 8, "phase1"), "phase1": (6, 6, "phase1"), "phase2": (2, 2, "phase2")}
    for stage, (steps, schedule_steps, phase) in stages.items():
        assert progress[stage]["steps"] == steps
        for tag in STEP_TAGS + (("l1",) if stage == "search" else ()):
            values = events.scalars[f"{stage}/{tag}"]
            assert sorted(values) == list(range(1, steps + 1)), f"{stage}/{tag}"
            assert all(math.isfinite(value) for value in values.values()), f"{stage}/{tag}"
        lr = recipe[phase]["lr"]
        expected = [nvidia_poly_lr(step, lr, schedule_steps, 0.2843) for step in range(1, steps + 1)]
        assert list(events.scalars[f"{stage}/lr"].values()) == pytest.approx(expected, rel=1e-6), stage
        assert all(value > 0 for value in events.scalars[f"{stage}/grad_norm"].values())
        assert list(events.scalars[f"{stage}/loss"].values()) == pytest.approx(progress[stage]["losses"], rel=1e-6)
    assert not any(tag.endswith("loss_scale") for tag in events.scalars)  # fp16 only

    history = MaskHistory.load(out / "search" / "mask_history.json")
    assert history.steps == [1, 2, 3, 4]
    for index in range(1, 4):  # the detector's distance: the largest to the earlier masks in its window of 3
        earlier = history.tickets[max(0, index - 2):index]
        for kind in ("head", "ffn"):
            expected = max(mask_distance(history.tickets[index], other)[kind] for other in earlier)
            assert events.scalars[f"search/mask_distance_{kind}"][index + 1] == pytest.approx(expected), kind
    for kind, layer in ((kind, layer) for kind in ("head", "ffn") for layer in (0, 1)):
        assert events.histograms[f"search/{kind}_coefficients/layer{layer}"] == [1, 2, 3, 4]
    assert events.images["search/mask_distance_heatmap"] == [4]


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-5), ("fp16", 2e-2)])
def test_grad_norm_is_the_norm_before_clipping_of_the_averaged_gradient(precision, tolerance, single_process_dist,
                                                                         tmp_path):
    """At ZeRO 0 DeepSpeed keeps no gradient norm; the stage's is the global norm of the gradient averaged over the
    micro-batches, before clipping (clip 1e-3 here, far below it) and, in fp16, without the loss scale (2^16): equal
    to plain fp32 autograd on a copy of the model with the same dropout masks (fp16 autocast: within 2%)."""
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=48, max_position_embeddings=16))  # BERT's 0.1 dropout
    generator = torch.Generator().manual_seed(1)
    micro_batches = []
    for _ in range(3):
        ids = torch.randint(1, 64, (2, 12), generator=generator)
        micro_batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.roll(1, 1),
                              "next_sentence_label": torch.randint(0, 2, (2,), generator=generator)})
    reference = copy.deepcopy(model)
    settings = StageSettings(name="norm", seed=5, global_batch_size=6, micro_batch_size=2,
                             optimizer=OptimizerConfig(), lr=1e-2, schedule=Schedule(total_steps=1), grad_clip=1e-3)
    tensorboard = TensorBoardLogger(tmp_path)
    with Stage.build(model, settings, Runtime(0, 1, torch.device("cpu"), precision), tensorboard) as stage:
        stage.run(lambda start: iter(micro_batches[start:]), 1)
    tensorboard.close()
    logged = TensorBoardEvents(tmp_path).scalars["norm/grad_norm"]

    torch.manual_seed(settings.seed)  # the stage's seed: the same dropout masks
    for batch in micro_batches:
        (reference(**batch).loss / len(micro_batches)).backward()
    norm = math.sqrt(sum(float(param.grad.double().pow(2).sum()) for param in reference.parameters()
                         if param.grad is not None))
    assert norm > 10 * settings.grad_clip  # clipping was active: the norm is the one before it
    assert list(logged) == [1] and logged[1] == pytest.approx(norm, rel=tolerance)


def scored(entry: dict, accuracies: list[tuple[int, float, float]]) -> dict:
    """``entry`` with evaluations at (step, the stage's Sec. 4.1 seconds then, validation MLM accuracy)."""
    return {**entry, "validation": [{"step": step, "train_seconds": seconds, "mlm_loss": 10 * (1 - accuracy),
                                     "mlm_accuracy": accuracy, "nsp_accuracy": 0.5, "eval_seconds": 0.5}
                                    for step, seconds, accuracy in accuracies]}


def dense_progress() -> dict:
    """Dense: 8 s of Sec. 4.1 time, final validation MLM accuracy 0.30."""
    return {"phase1": scored(stage([9.0, 8.0, 7.0], 6.0), [(2, 4.0, 0.20), (3, 6.0, 0.25)]),
            "phase2": scored(stage([6.8], 2.0), [(1, 2.0, 0.30)])}


def early_progress(phase1: list[float], phase2: float) -> dict:
    """Search 4 s + draw 1 s, then phase 1 (3 s, scored at 1.5 s and 3 s), phase 2 (2 s, scored at its end)."""
    progress = earlybert_progress()
    progress["search"] = scored(progress["search"], [(2, 4.0, 0.05)])
    progress["phase1"] = scored(progress["phase1"], [(2, 1.5, phase1[0]), (3, 3.0, phase1[1])])
    progress["phase2"] = scored(progress["phase2"], [(1, 2.0, phase2)])
    return progress


@pytest.mark.parametrize(("phase1", "phase2", "expected"), [
    ([0.31, 0.33], 0.34, {"reached": True, "stage": "phase1", "step": 2, "seconds": 6.5, "fraction": 6.5 / 8.0}),
    ([0.28, 0.30], 0.32, {"reached": True, "stage": "phase1", "step": 3, "seconds": 8.0, "fraction": 1.0}),
    ([0.20, 0.29], 0.31, {"reached": True, "stage": "phase2", "step": 1, "seconds": 10.0, "fraction": 10.0 / 8.0}),
    ([0.20, 0.29], 0.299, {"reached": False, "final_accuracy": 0.299}),
])
def test_time_to_the_dense_accuracy_on_synthetic_curves(tmp_path: Path, phase1, phase2, expected) -> None:
    """Sec. 4.1 time from the run's start: search 4 s + draw 1 s + the phase's seconds at the evaluation."""
    write_run(tmp_path / "dense", "dense", dense_progress())
    report = write_run(tmp_path / "early", "earlybert", early_progress(phase1, phase2), [tmp_path / "dense"])
    result = report["compare_to"]["time_to_dense_accuracy"]
    assert result == {"dense_accuracy": 0.30, "dense_seconds": 8.0, "final_accuracy": phase2, **expected}
    text = (tmp_path / "early" / "report.txt").read_text()
    if expected["reached"]:
        assert (f"time to the dense run's final validation MLM accuracy 0.3000: {expected['seconds']:.1f} s = "
                f"{expected['fraction']:.3f} of the dense run's 8.0 s ({expected['stage']} step {expected['step']})"
                in text)
    else:
        assert ("did not reach the dense run's final validation MLM accuracy 0.3000 (this run's final: 0.2990; "
                "dense time 8.0 s)") in text


def test_report_gives_each_stage_and_every_run_its_validation_scores(tmp_path: Path) -> None:
    write_run(tmp_path / "dense", "dense", dense_progress())
    reduced = dense_progress()
    reduced["phase2"] = scored(stage([7.1], 1.0), [(1, 1.0, 0.27)])
    write_run(tmp_path / "reduced", "reduced", reduced)
    report = write_run(tmp_path / "early", "earlybert", early_progress([0.2, 0.29], 0.31),
                       [tmp_path / "dense", tmp_path / "reduced"])
    assert report["validation"] == {"stage": "phase2", "step": 1, "mlm_loss": pytest.approx(6.9),
                                    "mlm_accuracy": 0.31, "nsp_accuracy": 0.5}
    assert report["stages"]["phase1"]["validation"]["mlm_accuracy"] == 0.29
    assert report["stages"]["phase1"]["evaluation_seconds"] is None  # the records' own sum is the recipe's
    assert [row["mode"] for row in report["side_by_side"]] == ["earlybert", "dense", "reduced"]
    assert [row["validation"]["mlm_accuracy"] for row in report["side_by_side"]] == [0.31, 0.30, 0.27]
    text = (tmp_path / "early" / "report.txt").read_text()
    assert "            phase1        3     7.1000        0.2900        0.5000" in text
    assert re.search(r"reduced \(reduced\) +reduced .* 0\.2700 +0\.5000\n", text)
    # The accuracy panel draws the evaluations: other accuracies, another picture.
    other = write_run(tmp_path / "other", "earlybert", early_progress([0.1, 0.15], 0.2),
                      [tmp_path / "dense", tmp_path / "reduced"])
    assert not np.array_equal(read_png(Path(report["plot"])), read_png(Path(other["plot"])))


def test_validation_series_place_evaluations_on_the_whole_schedule() -> None:
    points = validation_series(early_progress([0.2, 0.29], 0.31))
    assert [(p.stage, p.step, p.seconds, p.mlm_accuracy) for p in points] == [
        ("search", 2, 4.0, 0.05), ("phase1", 2, 6.5, 0.2), ("phase1", 3, 8.0, 0.29), ("phase2", 1, 10.0, 0.31)]
    assert time_to_accuracy(points, 0.5, 8.0) == {"dense_accuracy": 0.5, "dense_seconds": 8.0,
                                                  "final_accuracy": 0.31, "reached": False}


def test_the_demo_prints_both_runs_validation_and_the_time_to_dense_accuracy(tmp_path: Path) -> None:
    from earlybert_pretrain.demo import summary

    write_run(tmp_path / "dense", "dense", dense_progress())
    report = write_run(tmp_path / "early", "earlybert", early_progress([0.2, 0.29], 0.31), [tmp_path / "dense"])
    assert summary(report).splitlines() == [
        "validation (final models):",
        "  earlybert  MLM loss 6.9000  MLM accuracy 0.3100  NSP accuracy 0.5000  (10.0 s, Sec. 4.1)",
        "  dense      MLM loss 7.0000  MLM accuracy 0.3000  NSP accuracy 0.5000  (8.0 s, Sec. 4.1)",
        "time to the dense run's final validation MLM accuracy 0.3000: 10.0 s = 1.250 of the dense run's 8.0 s "
        "(phase2 step 1)"]
