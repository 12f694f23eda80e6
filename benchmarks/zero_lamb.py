"""Optimizer-state bytes per rank at ZeRO 0 / 1 / 2 with our LAMB on 2 ranks (checked against
``train/memory.memory_budget``), the step-time cost of the per-tensor trust ratio (one extra all-reduce per step),
and what the budget leaves for BERT-large's micro-batch on a 16 GB V100.

    python benchmarks/zero_lamb.py [--hidden 256] [--layers 4] [--steps 12] [--rounds 2] [--computed-only]

Launches itself as ranks 0 and 1 (gloo, CPU). Each configuration trains a BERT of the given width (vocab 8192,
FFN 4x, MLM + NSP, fp32) for ``--steps`` optimizer steps of 2 micro-batches x 8 sequences of 128 tokens per rank;
configurations alternate over ``--rounds`` rounds and each keeps its fastest mean wall-clock step (other jobs only
add time).
"Per-partition" is the same engine with the partition layouts removed: one LAMB ratio per flat partition, no extra
all-reduce (what DeepSpeed gives a plain LAMB; wrong, timed only as the baseline of the overhead). The time inside
the trust-ratio code (fragment norms + all-reduce + scaling) is measured directly too.
The BERT-large numbers are computed, not measured: see ``bert_large_micro_batch``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from earlybert_pretrain.train.memory import memory_budget

GIB = 2**30
CONFIGS = (("zero0", 0, True), ("zero1", 1, True), ("zero1 per-partition", 1, False), ("zero2", 2, True),
           ("zero2 per-partition", 2, False))


def launch(args: list[str]) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    processes = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
               "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        processes.append(subprocess.Popen([sys.executable, __file__, *args], env=env,
                                          stdout=None if rank == 0 else subprocess.DEVNULL))
    return max(process.wait() for process in processes)


def timed_trust_ratios(seconds: list[float]) -> None:
    """Wrap PartitionLayout.apply_trust_ratios to add its wall time to ``seconds[0]``."""
    from earlybert_pretrain.train.zero_lamb import PartitionLayout

    plain = PartitionLayout.apply_trust_ratios

    def apply(self, weight, update):
        start = time.perf_counter()
        plain(self, weight, update)
        seconds[0] += time.perf_counter() - start
    PartitionLayout.apply_trust_ratios = apply


def measure(args: argparse.Namespace) -> None:
    from earlybert_pretrain.config import OptimizerConfig
    from earlybert_pretrain.model.bert import BertConfig, BertForPreTraining
    from earlybert_pretrain.train.engine import init_distributed
    from earlybert_pretrain.train.stage import Runtime, Schedule, Stage, StageSettings

    rank, world, device = init_distributed()
    runtime = Runtime(rank, world, device, "fp32")
    config = BertConfig(vocab_size=8192, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=args.hidden // 64, intermediate_size=4 * args.hidden,
                        max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ratio_seconds = [0.0]
    timed_trust_ratios(ratio_seconds)

    def open_batches(start: int):
        generator = torch.Generator().manual_seed(rank * 10**6 + start)
        while True:
            ids = torch.randint(1, 8192, (8, 128), generator=generator)
            labels = torch.full_like(ids, -100)
            labels[:, :20] = ids[:, :20]
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                   "next_sentence_label": torch.zeros(8, dtype=torch.long)}

    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, zero_stage, exact in CONFIGS:
            settings = StageSettings(name=name.replace(" ", "_").replace("-", "_"), seed=0, global_batch_size=32,
                                     micro_batch_size=8, optimizer=OptimizerConfig(), lr=1e-3,
                                     schedule=Schedule(args.steps + 2, 0.1), grad_clip=1.0, zero_stage=zero_stage,
                                     log_every=10**9)
            torch.manual_seed(0)
            with Stage.build(BertForPreTraining(config), settings, runtime) as stage:
                if not exact:
                    stage.engine.optimizer.optimizer.partition_layouts = {}
                stage.run(open_batches, 2)  # warm-up steps, outside the timing
                # wall time: waiting for the other rank's all-reduce is part of the cost (the stage clock on CPU
                # is this process's CPU time, which leaves waits out)
                ratio_seconds[0], start_seconds = 0.0, stage.timer.wall_seconds
                result = stage.run(open_batches, 2 + args.steps)
                step = (stage.timer.wall_seconds - start_seconds) / args.steps
                entry = {"step_seconds": step, "trust_ratio_seconds": ratio_seconds[0] / args.steps,
                         "state": result.timing["optimizer_state_bytes"], "parameters": result.parameters}
                if name not in best or step < best[name]["step_seconds"]:
                    best[name] = entry
    if rank == 0:
        report(best, args)


def bert_large_micro_batch(zero_stage: int, seq: int, world_size: int = 2, memory: float = 16 * GIB,
                           reserve: float = 1.5 * GIB, **buckets: int) -> tuple[dict[str, int], int]:
    """Computed: (model-state bytes per GPU by component, largest micro-batch) for BERT-large (L=24, h=1024, a=16,
    336M parameters) at sequence length ``seq`` on a ``memory``-byte GPU, ``reserve`` kept for the CUDA context,
    workspace and fragmentation. Model states: ``train/memory.memory_budget`` (fp32 weights, gradients, LAMB state with
    the ZeRO share, DeepSpeed's buckets; ``buckets`` overrides the bucket sizes). Activations per sequence under
    autocast, no recomputation: s*h*L*(38 + 5*a*s/h) bytes -- Korthikanti et al. 2022, Eq. 2 with t=1 (34, all 16-bit)
    plus 4 for the two LayerNorms' fp32 inputs -- and the MLM head on 20 (seq 128) / 80 (seq 512) predicted positions:
    p*V*(2 + 4) bytes (fp16 logits, fp32 loss).
    """
    layers, hidden, heads, params, vocab = 24, 1024, 16, 336_000_000, 30522
    states = memory_budget(params, world_size, zero_stage, **buckets)
    predictions = 20 if seq <= 128 else 80
    per_sequence = seq * hidden * layers * (38 + 5 * heads * seq / hidden) + predictions * vocab * 6
    return states, int((memory - reserve - sum(states.values())) // per_sequence)


def report(best: dict[str, dict], args: argparse.Namespace) -> None:
    params = best["zero0"]["parameters"]
    print(f"\nBERT hidden {args.hidden}, {args.layers} layers: {params / 1e6:.2f}M parameters, 2 ranks, fp32, CPU")
    print(f"{'config':22} {'state MiB/rank':>14} {'B/param':>8} {'budget':>8} {'step s':>8} {'ratio code s':>12}")
    for name, entry in best.items():
        total = entry["state"]["total"]
        budget = memory_budget(params, 2, int(name[4]))["optimizer_state"]
        print(f"{name:22} {total / 2**20:14.2f} {total / params:8.2f} {budget / params:8.2f} "
              f"{entry['step_seconds']:8.3f} {entry['trust_ratio_seconds']:12.4f}")
    for stage in ("zero1", "zero2"):
        exact, plain = best[stage], best[f"{stage} per-partition"]
        print(f"{stage}: step time exact / per-partition = {exact['step_seconds'] / plain['step_seconds']:.3f}; "
              f"trust-ratio code (norms + all-reduce) = {exact['trust_ratio_seconds'] / exact['step_seconds']:.2%} "
              "of the step")
    print(json.dumps({"measured": best, "computed_bert_large_v100_16gb": bert_large_table()}, default=str))


def bert_large_table() -> dict:
    """The computed BERT-large rows, printed: engine defaults, and DeepSpeed's default 5e8-element buckets."""
    print("\nComputed, not measured: BERT-large (336M) on a 16 GB V100, 2 ranks (train/memory.py + activations)")
    table = {}
    deepspeed_defaults = {"reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000}
    for zero_stage in (0, 1, 2):
        for label, buckets in (("engine defaults", {}), ("DeepSpeed's 5e8 buckets", deepspeed_defaults)):
            if zero_stage == 0 and buckets:
                continue  # ZeRO 0 has no configurable bucket
            rows = {seq: bert_large_micro_batch(zero_stage, seq, **buckets) for seq in (128, 512)}
            states = rows[128][0]
            table[f"zero{zero_stage} {label}"] = {
                "model_state_gib": {key: round(value / GIB, 2) for key, value in states.items()},
                "micro_batch": {str(seq): row[1] for seq, row in rows.items()}}
            print(f"  zero{zero_stage} ({label}): {' + '.join(f'{k} {v / GIB:.2f}' for k, v in states.items())} "
                  f"= {sum(states.values()) / GIB:.2f} GiB -> micro-batch {rows[128][1]} at seq 128, "
                  f"{rows[512][1]} at seq 512")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--computed-only", action="store_true", help="only the computed BERT-large table")
    args = parser.parse_args()
    if args.computed_only:
        bert_large_table()
        return
    if "RANK" not in os.environ:
        sys.exit(launch(sys.argv[1:]))
    import logging

    logging.basicConfig(level=logging.WARNING)
    measure(args)


if __name__ == "__main__":
    main()
