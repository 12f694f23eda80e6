"""The input pipeline: micro-batch build rate by worker count, and how long a training step waits for its batches under
gradient accumulation.

    python benchmarks/input_pipeline.py [--work-dir /tmp/earlybert-bench] [--batches 200] [--workers 0 1 2 4]
                                        [--accumulation 1 16 64] [--steps 6] [--json OUT]

1. Examples per second at seq 128 and 512 (max predictions 20 / 80, micro-batches of 32) on the real Wikipedia
   sample's shards (built once into ``--work-dir`` as benchmarks/pretrain_e2e.py does), through
   ``pretrain.batches.prefetched`` with 0 (in the training process), 1, 2 and 4 workers; the first batch (worker
   start-up) is not timed. Per worker = total / workers (0 workers: per process). The rate cannot grow past the
   machine's cores, which the benchmark prints.
2. Data wait per optimizer step at accumulation 1, 16 and 64 (micro-batches of 32 at seq 128, two workers at the
   config's prefetch of 2, as the recipe opens them): ``Stage.run`` on a small BERT (hidden 64, 2 layers). Reported:
   the mean wait per step after the first (worker start-up), the serial build time of a step's micro-batches (at
   the in-process rate of part 1), and the wait's share of wall time. On a CPU a micro-batch computes far longer
   than a worker builds one, so the share stays small; the wait per step against the serial build time is the
   number to read (a GPU computes its micro-batch in about a worker's build time). Run with OMP_NUM_THREADS=1 on a
   shared machine: OpenMP's spinning threads slow a loaded 2-core machine down many times over.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from pretrain_e2e import build_shards

from earlybert_pretrain.config import OptimizerConfig
from earlybert_pretrain.model.bert import BertConfig, BertForPreTraining
from earlybert_pretrain.pretrain.batches import PretrainingBatches, ShardedCorpus, prefetched
from earlybert_pretrain.train.engine import init_distributed
from earlybert_pretrain.train.stage import Runtime, Schedule, Stage, StageHook, StageSettings

SEQ_PREDICTIONS = {128: 20, 512: 80}
MICRO_BATCH = 32


def build_rate(corpus: ShardedCorpus, seq_len: int, workers: int, batches: int) -> float:
    """Examples per second over ``batches`` micro-batches after the first."""
    stream = PretrainingBatches(corpus, seq_len, SEQ_PREDICTIONS[seq_len], MICRO_BATCH, seed=0)
    iterator = prefetched(stream, workers, prefetch=2)
    next(iterator)  # workers started, plan built
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * MICRO_BATCH / (time.perf_counter() - started)


class StepWaits(StageHook):
    def __init__(self) -> None:
        self.waits: list[float] = []

    def after_step(self, stage: Stage, step: int) -> bool:
        self.waits.append(stage.timer.last_data_wait_seconds)
        return False


def data_wait(corpus: ShardedCorpus, accumulation: int, steps: int, serial_rate: float) -> dict:
    """``steps`` optimizer steps of ``accumulation`` micro-batches each; waits per step after the first."""
    rank, world_size, device = init_distributed()
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig(vocab_size=corpus.vocab_size, hidden_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, intermediate_size=256, max_position_embeddings=128))
    settings = StageSettings(name=f"accumulation{accumulation}", seed=0,
                             global_batch_size=MICRO_BATCH * accumulation * world_size, micro_batch_size=MICRO_BATCH,
                             optimizer=OptimizerConfig(), lr=1e-3, schedule=Schedule(total_steps=steps), grad_clip=1.0)

    def open_batches(micro_batches_done: int):
        stream = PretrainingBatches(corpus, 128, SEQ_PREDICTIONS[128], MICRO_BATCH, rank, world_size, seed=0,
                                    start_sample=micro_batches_done * MICRO_BATCH * world_size)
        return prefetched(stream, num_workers=2, prefetch=2, pin_memory=device.type == "cuda",
                          step_batches=accumulation)

    hook = StepWaits()
    with Stage.build(model, settings, Runtime(rank, world_size, device, "fp32")) as stage:
        result = stage.run(open_batches, steps, [hook])
    steady = hook.waits[1:]
    return {"wait_per_step": statistics.mean(steady), "max_wait_per_step": max(steady),
            "serial_build_per_step": accumulation * MICRO_BATCH / serial_rate,
            "wait_share": result.timing["data_wait_share"], "mean_step_wall_seconds":
            result.timing["wall_seconds"] / result.steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/earlybert-bench"))
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--accumulation", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    shard_dir = build_shards(None, args.work_dir)
    corpus = ShardedCorpus(shard_dir)
    print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; shards {shard_dir} ({corpus.num_tokens:,} tokens)")
    rates = {}
    for seq_len in SEQ_PREDICTIONS:
        for workers in args.workers:
            rate = build_rate(corpus, seq_len, workers, args.batches)
            rates[f"seq{seq_len}_workers{workers}"] = rate
            per_worker = rate / max(1, workers)
            print(f"seq {seq_len}  workers {workers}:  {rate:8.0f} examples/s  {per_worker:8.0f} per worker")
    serial_rate = rates.get("seq128_workers0") or build_rate(corpus, 128, 0, args.batches)
    waits = {}
    for accumulation in args.accumulation:
        waits[accumulation] = wait = data_wait(corpus, accumulation, args.steps, serial_rate)
        print(f"accumulation {accumulation:3d}: data wait {wait['wait_per_step']:.4f} s a step (max "
              f"{wait['max_wait_per_step']:.4f}; serial build {wait['serial_build_per_step']:.3f} s; step wall "
              f"{wait['mean_step_wall_seconds']:.3f} s; {wait['wait_share']:.1%} of wall incl. start-up)")
    if args.json:
        args.json.write_text(json.dumps({"rates": rates, "data_wait": waits}, indent=2))


if __name__ == "__main__":
    main()
