"""The input pipeline: micro-batch build rate by worker count, and how much of a step's wall time waits for data.

    python benchmarks/input_pipeline.py [--work-dir /tmp/earlybert-bench] [--batches 200] [--workers 0 1 2 4]
                                        [--steps 60] [--json OUT]

1. Examples per second at seq 128 and 512 (max predictions 20 / 80, micro-batches of 32) on the real Wikipedia
   sample's shards (built once into ``--work-dir`` as benchmarks/pretrain_e2e.py does), through
   ``pretrain.batches.prefetched`` with 0 (in the training process), 1, 2 and 4 workers; the first batch (worker
   start-up) is not timed. Per worker = total / workers (0 workers: per process). The rate cannot grow past the
   machine's cores, which the benchmark prints.
2. The share of wall time the training loop waits for its batches (TensorBoard-free: the runs' report.json,
   ``data_wait_share``), the demo recipe with the tiny model (configs/tiny.yaml), mode=dense, ``--steps`` steps,
   before (data.num_workers=0: batches built between steps) and after (data.num_workers=2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pretrain_e2e import REPO, build_shards

from earlybert_pretrain.pretrain.batches import PretrainingBatches, ShardedCorpus, prefetched

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


def data_wait(shard_dir: Path, work_dir: Path, workers: int, steps: int) -> dict:
    """One dense tiny-model run; its phases' data-wait share, wall and protocol seconds from report.json."""
    out = work_dir / f"input_pipeline_workers{workers}"
    command = [sys.executable, "-m", "earlybert_pretrain.pretrain", "--config",
               str(REPO / "configs/pretrain_demo_cpu.yaml"), "model=tiny.yaml", "mode=dense", f"total_steps={steps}",
               "search.heads_to_prune=1",  # validated in every mode; the tiny model has 4 heads a layer
               f"data.shard_dir={shard_dir}", f"data.num_workers={workers}", "engine.checkpoint_every=100000",
               f"output_dir={out}", "--overwrite"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"run with {workers} workers failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    stages = json.loads((out / "report.json").read_text())["stages"]
    return {name: {key: stages[name][key] for key in ("data_wait_share", "data_wait_seconds", "wall_seconds",
                                                      "seconds")} for name in ("phase1", "phase2")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/earlybert-bench"))
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--steps", type=int, default=60)
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
    waits = {workers: data_wait(shard_dir, args.work_dir, workers, args.steps) for workers in (0, 2)}
    for workers, phases in waits.items():
        cells = "  ".join(f"{name} {value['data_wait_share']:6.2%} of "
                          f"{value['wall_seconds'] + value['data_wait_seconds']:6.1f} s"
                          for name, value in phases.items())
        print(f"data wait, tiny model, data.num_workers={workers}:  {cells}")
    if args.json:
        args.json.write_text(json.dumps({"rates": rates, "data_wait": waits}, indent=2))


if __name__ == "__main__":
    main()
