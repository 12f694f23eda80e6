"""The background input pipeline (workers build exactly the in-process batches; SIGKILL + resume with workers is
bit-identical) and the step timer (process CPU time on CPU; wall, data-wait and tokens/s in TensorBoard)."""

from __future__ import annotations

import itertools
import json
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_pretrain import final_weights, run_cli, tiny_recipe

from earlybert_pretrain.pretrain import cli as pretrain
from earlybert_pretrain.pretrain.batches import MicroBatches, PretrainingBatches, ShardedCorpus, prefetched
from earlybert_pretrain.train.telemetry import StepTimer

pytest_plugins = ["data_fixtures"]  # the session-wide build of the real dump


@pytest.fixture(scope="module")
def corpus(wiki_build) -> ShardedCorpus:
    return ShardedCorpus(wiki_build.shards)


def stream(corpus: ShardedCorpus, start_sample: int = 0, rank: int = 1) -> PretrainingBatches:
    return PretrainingBatches(corpus, 64, 10, micro_batch_size=3, rank=rank, world_size=2, seed=4,
                              start_sample=start_sample)


def test_workers_build_exactly_the_in_process_batches_in_order(corpus: ShardedCorpus) -> None:
    start = 2 * 3 * 7  # a resumed stream: the 8th micro-batch on
    expected = list(itertools.islice(prefetched(stream(corpus, start), 0, 2), 9))
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    got = list(itertools.islice(prefetched(stream(corpus, start), 2, 3), 9))
    assert torch.equal(torch.random.get_rng_state(), before)  # the loader leaves dropout's RNG alone
    assert len(got) == len(expected) == 9
    for want, have in zip(expected, got):
        assert want.keys() == have.keys()
        assert all(torch.equal(want[key], have[key]) for key in want)


def test_a_worker_batch_is_pinned_whole_by_the_loaders_pin_thread(corpus: ShardedCorpus, monkeypatch) -> None:
    """On CUDA the loader's pin thread gets ArrayBatch objects from the workers; its pin function must turn each into
    the batch's tensors, pinned (pinning itself needs CUDA: a copy stands in for it here)."""
    from torch.utils.data._utils.pin_memory import pin_memory as loader_pin

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda tensor, *args: pinned.append(tensor) or tensor.clone())
    source = stream(corpus)
    got = loader_pin(MicroBatches(source)[5])
    expected = source.batch(5 * 3 * 2)
    assert got.keys() == expected.keys() and len(pinned) == len(expected)
    assert all(torch.equal(got[key], expected[key]) for key in expected)


def test_the_step_clock_is_process_cpu_time_on_cpu() -> None:
    timer = StepTimer("cpu")
    assert timer.clock == "process_cpu"
    with timer.data_wait():
        time.sleep(0.2)
    with timer.step(tokens=10):
        time.sleep(0.3)  # wall time only: another job holding the CPU looks like this
    assert timer.last_data_wait_seconds >= 0.2 and timer.last_wall_seconds >= 0.3
    assert timer.last_seconds < 0.1
    with timer.step(tokens=10):
        deadline = time.process_time() + 0.1
        while time.process_time() < deadline:  # 0.1 CPU-s of work, however long other jobs make it take
            pass
    assert 0.1 <= timer.last_seconds <= timer.last_wall_seconds + 0.01
    summary = timer.summary()
    assert summary["steps"] == 2 and summary["tokens"] == 20
    assert summary["wall_seconds"] == pytest.approx(timer.wall_seconds) and summary["data_wait_seconds"] >= 0.2
    assert 0.0 < summary["data_wait_share"] < 1.0
    resumed = StepTimer("cpu")
    resumed.load_state_dict(timer.state_dict())
    assert resumed.summary() == summary


def scalar_steps(tensorboard: Path) -> dict[str, list[int]]:
    events = EventAccumulator(str(tensorboard), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [event.step for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


TIMING_TAGS = ("step_seconds", "step_wall_seconds", "data_wait_seconds", "tokens_per_second")


@pytest.mark.slow
def test_sigkill_with_workers_resumes_bit_identically_and_timing_reaches_tensorboard(
        wiki_build, single_process_dist, tmp_path: Path) -> None:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**tiny_recipe(wiki_build.shards), "mode": "dense"}))
    reference = tmp_path / "in_process"
    assert pretrain.main(["--config", str(recipe), f"output_dir={reference}", "data.num_workers=0"]) == 0

    out = tmp_path / "workers"
    args = ["--config", str(recipe), f"output_dir={out}", "--resume", "data.num_workers=2", "data.prefetch=4"]
    code, log = run_cli(args, kill_on=r"phase1 step 8/33")  # the checkpoint at step 6 is on disk
    assert code == -signal.SIGKILL, log[-3000:]
    code, log = run_cli(args)
    assert code == 0, log[-3000:]
    assert "phase1: resumed at step 6 of 33" in log
    expected, got = final_weights(reference), final_weights(out)
    assert expected.keys() == got.keys()
    assert all(torch.equal(tensor, got[name]) for name, tensor in expected.items())

    steps = scalar_steps(reference / "tensorboard")
    for stage, count in (("phase1", 33), ("phase2", 7)):
        for tag in TIMING_TAGS:
            assert steps[f"{stage}/{tag}"] == list(range(1, count + 1)), f"{stage}/{tag}"
    report = json.loads((reference / "report.json").read_text())
    for stage in ("phase1", "phase2"):
        summary = report["stages"][stage]
        assert summary["wall_seconds"] > 0 and summary["data_wait_seconds"] > 0 and summary["tokens_per_second"] > 0
