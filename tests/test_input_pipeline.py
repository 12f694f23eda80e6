"""The background input pipeline (workers build exactly the in-process batches; under gradient accumulation a step's
micro-batches are built while the previous ones compute; SIGKILL + resume with workers is bit-identical) and the step
timer (process CPU time on CPU; waits for data paused out of it; wall, data-wait and tokens/s in TensorBoard)."""

from __future__ import annotations

import itertools
import json
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_pretrain import final_weights, run_cli, tiny_recipe
from test_report import TensorBoardEvents

from earlybert_pretrain.config import OptimizerConfig
from earlybert_pretrain.model.bert import BertConfig, BertForPreTraining
from earlybert_pretrain.pretrain import cli as pretrain
from earlybert_pretrain.pretrain.batches import MicroBatches, PretrainingBatches, ShardedCorpus, prefetched
from earlybert_pretrain.train.stage import Runtime, Schedule, Stage, StageHook, StageSettings
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


CLOCK_SLACK = 0.005  # the CPU and wall clocks tick apart; a thread's CPU time is never more wall time than this


def burn_cpu(seconds: float) -> None:
    """CPU seconds of work in this thread, however long other jobs make it take: at least as much wall time."""
    deadline = time.thread_time() + seconds
    while time.thread_time() < deadline:
        pass


def test_the_step_clock_is_process_cpu_time_on_cpu() -> None:
    timer = StepTimer("cpu")
    assert timer.clock == "process_cpu"
    with timer.data_wait():
        time.sleep(0.2)
    with timer.step():
        time.sleep(0.3)  # wall time only: another job holding the CPU looks like this
    assert timer.last_data_wait_seconds >= 0.2 and timer.last_wall_seconds >= 0.3
    assert timer.last_seconds < 0.1
    timer.count_tokens(10)
    with timer.step():
        burn_cpu(0.1)
    timer.count_tokens(10)
    # this thread's 0.1 CPU-s; the process clock also counts other threads, the wall clock at least this one's
    assert timer.last_seconds >= 0.1 and timer.last_wall_seconds >= 0.1 - CLOCK_SLACK
    summary = timer.summary()
    assert summary["steps"] == 2 and summary["tokens"] == 20
    assert summary["wall_seconds"] == pytest.approx(timer.wall_seconds) and summary["data_wait_seconds"] >= 0.2
    assert 0.0 < summary["data_wait_share"] < 1.0
    resumed = StepTimer("cpu")
    resumed.load_state_dict(timer.state_dict())
    assert resumed.summary() == summary


def test_a_wait_for_data_inside_a_step_is_paused_out_of_its_clocks() -> None:
    """A step fetches its micro-batches as it goes; building one in this process (CPU time) is data wait."""
    timer = StepTimer("cpu")
    with timer.step():
        burn_cpu(0.05)
        with timer.data_wait():
            burn_cpu(0.2)
        with timer.data_wait():
            time.sleep(0.1)
    assert 0.05 <= timer.last_seconds < 0.15 and timer.last_wall_seconds < timer.last_data_wait_seconds
    assert timer.last_data_wait_seconds >= 0.3 - CLOCK_SLACK
    assert timer.data_wait_seconds == timer.last_data_wait_seconds
    with timer.step():
        pass
    # a step's own waits only
    assert timer.last_data_wait_seconds == 0.0 and timer.data_wait_seconds >= 0.3 - CLOCK_SLACK


BUILD_SECONDS = 0.1  # per micro-batch, in a worker
COMPUTE_SECONDS = 0.08  # per micro-batch in the step: two workers (0.05 s a batch) keep up, with a margin
ACCUMULATION = 8


class SlowBatches(PretrainingBatches):
    """Micro-batches that take BUILD_SECONDS each to build (sleeping, so a loaded machine does not change it)."""

    def arrays(self, first_global: int) -> dict:
        time.sleep(BUILD_SECONDS)
        return super().arrays(first_global)


class SlowCompute(StageHook):
    """A micro-batch's compute takes COMPUTE_SECONDS more; records each step's data wait."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def extra_loss(self, module):
        time.sleep(COMPUTE_SECONDS)
        return None

    def after_step(self, stage: Stage, step: int) -> bool:
        self.waits.append(stage.timer.last_data_wait_seconds)
        return False


def test_under_accumulation_a_step_consumes_its_micro_batches_as_they_arrive(corpus, single_process_dist) -> None:
    """Eight micro-batches a step from two workers holding four in flight: the old loop fetched all eight before
    the step, so half of every step's batches were built while it waited (0.2 s a step here); taken as the step
    reaches them, the workers (20 batches/s) stay ahead of the step (12.5 a second)."""
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(vocab_size=corpus.vocab_size, hidden_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=32, max_position_embeddings=32))
    settings = StageSettings(name="slow", seed=0, global_batch_size=2 * ACCUMULATION, micro_batch_size=2,
                             optimizer=OptimizerConfig(), lr=1e-3, schedule=Schedule(total_steps=5), grad_clip=1.0)
    hook = SlowCompute()

    def open_batches(micro_batches_done: int):
        stream = SlowBatches(corpus, 32, 5, micro_batch_size=2, seed=4, start_sample=2 * micro_batches_done)
        return prefetched(stream, num_workers=2, prefetch=2)  # four in flight, not sized to the step

    with Stage.build(model, settings, Runtime(0, 1, torch.device("cpu"), "fp32")) as stage:
        assert stage.accumulation_steps == ACCUMULATION
        stage.run(open_batches, 5, [hook])
    serial = ACCUMULATION * BUILD_SECONDS
    steady = hook.waits[1:]  # the first step also waits for the workers to start
    assert len(steady) == 4 and max(steady) < 0.1 * serial, hook.waits


def test_the_loader_builds_a_whole_step_while_the_previous_one_computes(corpus) -> None:
    """Two workers at prefetch 2 would hold four micro-batches; sized to a step of eight, the next step's eight are
    all built while this one computes (1.2 s here), so fetching them takes no build time (without: 0.4 s)."""
    stream = SlowBatches(corpus, 32, 5, micro_batch_size=2, seed=4)
    batches = prefetched(stream, num_workers=2, prefetch=2, step_batches=ACCUMULATION)
    next(batches)  # workers started
    time.sleep(12 * BUILD_SECONDS)  # a step computing: time for the workers to build twelve
    started = time.perf_counter()
    step = list(itertools.islice(batches, ACCUMULATION))
    assert len(step) == ACCUMULATION and time.perf_counter() - started < BUILD_SECONDS


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

    scalars = TensorBoardEvents(reference / "tensorboard").scalars
    for stage, count in (("phase1", 33), ("phase2", 7)):
        for tag in TIMING_TAGS:
            assert sorted(scalars[f"{stage}/{tag}"]) == list(range(1, count + 1)), f"{stage}/{tag}"
    report = json.loads((reference / "report.json").read_text())
    for stage in ("phase1", "phase2"):
        summary = report["stages"][stage]
        assert summary["wall_seconds"] > 0 and summary["data_wait_seconds"] > 0 and summary["tokens_per_second"] > 0
