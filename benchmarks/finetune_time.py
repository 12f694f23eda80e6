"""Fine-tuning time: dense vs an EarlyBERT ticket on the same model and batches (paper Sec. 4.1 protocol, Sec. 4.2).

Measures the median training-step time (forward, backward, AdamW; data I/O excluded, CUDA-synchronised) of
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

from earlybert_pretrain.finetune.config import FinetuneConfig, resolve_heads_to_prune
from earlybert_pretrain.finetune.loop import make_optimizer, timed_step
from earlybert_pretrain.finetune.models import BertForSequenceClassification
from earlybert_pretrain.finetune.runtime import Runtime
from earlybert_pretrain.model.bert import BertConfig
from earlybert_pretrain.tickets.draw import l1_penalty, random_ticket
from earlybert_pretrain.tickets.prune import prune
from earlybert_pretrain.train.telemetry import StepTimer

SEARCH_EPOCHS, PRUNED_EPOCHS, DENSE_EPOCHS = 0.2, 2.0, 3.0  # Sec. 4.2


def interleaved_step_seconds(variants: dict, batch, runtime: Runtime, steps: int, warmup: int) -> dict:
    """Per-variant step times, one step of each variant in turn so that load changes on a shared machine hit all
    of them alike; returns {name: [seconds per timed step]}."""
    states = {}
    for name, (model, search) in variants.items():
        model.to(runtime.device).train()
        extra = (lambda model=model: l1_penalty(model, 1e-4)) if search else None
        states[name] = (model, make_optimizer(model, 2e-5, 0.01, 1e-6), extra, StepTimer(runtime.device))
    times = {name: [] for name in variants}
    for index in range(warmup + steps):
        for name, (model, optimizer, extra, timer) in states.items():
            timed_step(model, batch, optimizer, None, runtime, timer, 1.0, extra_loss=extra)
            if index >= warmup:
                times[name].append(timer.last_seconds)
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

    runtime = Runtime.from_env(args.precision)
    torch.manual_seed(0)
    if args.model:
        dense = BertForSequenceClassification.from_pretrained(args.model, num_labels=2)
    else:
        dense = BertForSequenceClassification(BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    config = dense.config
    heads_to_prune = resolve_heads_to_prune(FinetuneConfig(model_dir="-"), config)
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
        "precision": str(runtime.amp_dtype or "fp32"), "batch": args.batch, "seq": args.seq, "steps": args.steps,
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
