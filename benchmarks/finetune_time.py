"""Fine-tuning time: dense vs an EarlyBERT ticket on the same model and batches (paper Sec. 4.1 protocol, Sec. 4.2).

Measures the median training-step time on the training backend (forward, backward, AdamW; data I/O excluded,
CUDA-synchronised) of
  * the dense model (dense fine-tuning),
  * the dense model with slimming coefficients and the L1 penalty (the search stage),
  * the model pruned by a ticket with EarlyBERT's fine-tuning counts (4 of 12 heads per layer, 40% FFN, global);
which neurons survive does not change the speed, so a random ticket with those counts stands in for a drawn one.
The three are stepped in turn (dense, search, pruned, dense, ...) and the median taken, so that a shared, loaded
machine slows all of them alike.
Then applies the paper's protocol to an epoch of E steps: dense = 3 E steps; EarlyBERT = 0.2 E search steps + 2 E
pruned steps; and prints the step-time ratio and the total-time ratio (paper: 0.55-0.60 of the dense time on GLUE).

    python benchmarks/finetune_time.py                      # BERT-base geometry, random weights, CPU-sized batch
    python benchmarks/finetune_time.py --model M --batch 32 --seq 128 --steps 30   # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from earlybert_pretrain.config import OptimizerConfig
from earlybert_pretrain.finetune.config import FinetuneSearchConfig
from earlybert_pretrain.finetune.models import BertForSequenceClassification
from earlybert_pretrain.model.bert import BertConfig
from earlybert_pretrain.tickets.draw import l1_penalty, random_ticket
from earlybert_pretrain.tickets.prune import prune
from earlybert_pretrain.train.engine import init_distributed, resolve_precision
from earlybert_pretrain.train.stage import Runtime, Schedule, Stage, StageHook, StageSettings

SEARCH_EPOCHS, PRUNED_EPOCHS, DENSE_EPOCHS = 0.2, 2.0, 3.0  # Sec. 4.2


class L1Term(StageHook):
    def extra_loss(self, module):
        return l1_penalty(module, 1e-4)


def interleaved_step_seconds(variants: dict, batch, runtime: Runtime, steps: int, warmup: int) -> dict:
    """Per-variant step times on the training backend (the fine-tuning recipe's AdamW stage), one step of each
    variant in turn so that load changes on a shared machine hit all of them alike; {name: [seconds per step]}."""
    optimizer = OptimizerConfig(name="adamw", eps=1e-6, weight_decay=0.01)
    stages, hooks = {}, {}
    for name, (model, search) in variants.items():
        settings = StageSettings(name=name, seed=0, global_batch_size=len(batch["input_ids"]),
                                 micro_batch_size=len(batch["input_ids"]), optimizer=optimizer, lr=2e-5,
                                 schedule=Schedule(warmup + steps, kind=None), grad_clip=1.0)
        stages[name] = Stage.build(model, settings, runtime)
        hooks[name] = [L1Term()] if search else []
    times = {name: [] for name in variants}
    try:
        for index in range(warmup + steps):
            for name, stage in stages.items():
                stage.train_step([batch], hooks[name])
                if index >= warmup:
                    times[name].append(stage.timer.last_seconds)
    finally:
        for stage in stages.values():
            stage.release()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="HF-format BERT folder; default: BERT-base geometry with random weights")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ffn-ratio", type=float, default=0.4)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()

    rank, world_size, device = init_distributed()
    runtime = Runtime(rank, world_size, device, resolve_precision(args.precision, device))
    torch.manual_seed(0)
    if args.model:
        dense = BertForSequenceClassification.from_pretrained(args.model, num_labels=2)
    else:
        dense = BertForSequenceClassification(BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    config = dense.config
    heads_to_prune = FinetuneSearchConfig().heads_to_prune_for(config)
    ticket = random_ticket(config, heads_to_prune, args.ffn_ratio, "global", seed=0)
    pruned = prune(dense, ticket)
    searched = copy.deepcopy(dense)
    searched.add_slimming_coefficients()

    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, config.vocab_size, (args.batch, args.seq), generator=generator),
             "token_type_ids": torch.zeros(args.batch, args.seq, dtype=torch.long),
             "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
             "labels": torch.randint(0, 2, (args.batch,), generator=generator)}
    batch = {name: value.to(runtime.device) for name, value in batch.items()}

    samples = interleaved_step_seconds({"dense": (dense, False), "search": (searched, True), "pruned": (pruned, False)},
                                       batch, runtime, args.steps, args.warmup)
    times = {name: statistics.median(values) for name, values in samples.items()}
    earlybert_total = SEARCH_EPOCHS * times["search"] + PRUNED_EPOCHS * times["pruned"]
    dense_total = DENSE_EPOCHS * times["dense"]
    result = {
        "device": torch.cuda.get_device_name() if runtime.device.type == "cuda" else "cpu",
        "precision": runtime.precision, "batch": args.batch, "seq": args.seq, "steps": args.steps,
        "geometry": {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
                     "heads_per_layer": pruned.config.heads_per_layer[0], "ffn_kept": sum(pruned.config.ffn_per_layer),
                     "ffn_dense": sum(config.ffn_per_layer)},
        "median_step_seconds": times,
        "mean_step_seconds": {name: statistics.fmean(values) for name, values in samples.items()},
        "step_time_ratio_pruned_vs_dense": times["pruned"] / times["dense"],
        "step_time_ratio_search_vs_dense": times["search"] / times["dense"],
        "total_time_ratio_earlybert_vs_dense": earlybert_total / dense_total,
        "time_saved": 1 - earlybert_total / dense_total,
    }
    print(f"device {result['device']} ({result['precision']}), batch {args.batch} x seq {args.seq}, "
          f"{args.steps} timed steps each")
    for name, seconds in times.items():
        print(f"  {name:7s} step: {1000 * seconds:8.1f} ms   ratio to dense {seconds / times['dense']:.3f}")
    print(f"protocol: EarlyBERT (0.2 ep search + 2 ep pruned) / dense (3 ep) = "
          f"{result['total_time_ratio_earlybert_vs_dense']:.3f}  (paper: 0.55-0.60); saved {result['time_saved']:.1%}")
    if args.json:
        from earlybert_pretrain.common.files import atomic_write_json

        atomic_write_json(args.json, result)


if __name__ == "__main__":
    main()
