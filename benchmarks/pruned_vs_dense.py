"""Measured step time of a pruned EarlyBERT ticket vs dense BERT, beside the FLOP ratio the ticket report predicts.

    python benchmarks/pruned_vs_dense.py [--batch 8] [--seq 128] [--threads 2] [--iters 5] [--clock wall|cpu]

Forward + backward of BertForPreTraining (MLM on 20 of 128 positions, NSP) in BERT-base geometry for the dense model
and for 4-heads/30%-FFN (pre-training, Sec. 4.3) and 4-heads/40%-FFN (fine-tuning) global tickets, each drawn as is
and with every layer's kept FFN width rounded to a multiple of 8 (``ffn_multiple_of=8``). The tickets come from
synthetic coefficients whose scale shrinks with depth, so later layers lose more neurons as the paper observes
(Sec. 3.2) and the kept FFN widths are uneven, like a real draw. Models are timed in interleaved rounds and each
one's fastest step is used (best of N): on a shared machine other jobs only ever add time. ``--clock cpu`` times
the CPU seconds this process used instead of wall time; with ``--threads 1`` that is immune to other jobs taking
the cores (with more threads, OpenMP spin-waits would count). No optimizer step: it is the same element-wise work
per parameter for every model and not what the ticket changes.
"""

from __future__ import annotations

import argparse
import time

import torch

from earlybert_pretrain.model.bert import BertConfig, BertForPreTraining, flops_per_token
from earlybert_pretrain.tickets.draw import draw_ticket
from earlybert_pretrain.tickets.prune import prune
from earlybert_pretrain.tickets.ticket import Ticket

# (name, heads pruned per layer, global FFN ratio, kept FFN widths rounded to a multiple of)
TICKETS = (("4 heads / 30% FFN", 4, 0.3, 1), ("4 heads / 30% FFN, widths x8", 4, 0.3, 8),
           ("4 heads / 40% FFN", 4, 0.4, 1), ("4 heads / 40% FFN, widths x8", 4, 0.4, 8))


def synthetic_ticket(config: BertConfig, heads_to_prune: int, ffn_ratio: float, ffn_multiple_of: int) -> Ticket:
    generator = torch.Generator().manual_seed(0)
    coefficients = {
        "head": [torch.rand(n, generator=generator) for n in config.heads_per_layer],
        "ffn": [torch.rand(n, generator=generator) * (1.0 - 0.03 * layer)
                for layer, n in enumerate(config.ffn_per_layer)],
    }
    return draw_ticket(coefficients, heads_to_prune, ffn_ratio, "global", config=config,
                       ffn_multiple_of=ffn_multiple_of)


def make_batch(config: BertConfig, batch: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1000, config.vocab_size, (batch, seq), generator=generator)
    labels = torch.full_like(input_ids, -100)
    predicted = torch.rand(batch, seq, generator=generator).argsort(dim=1)[:, : max(1, seq * 20 // 128)]
    labels.scatter_(1, predicted, input_ids.gather(1, predicted))
    values = {"input_ids": input_ids, "token_type_ids": (torch.arange(seq) >= seq // 2).long().expand(batch, seq),
              "attention_mask": torch.ones(batch, seq, dtype=torch.long), "labels": labels,
              "next_sentence_label": torch.randint(0, 2, (batch,), generator=generator)}
    return {key: value.to(device) for key, value in values.items()}


def training_step(model: BertForPreTraining, batch: dict[str, torch.Tensor], device: torch.device, clock) -> float:
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = clock()
    model(**batch).loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = BertConfig()
    dense = BertForPreTraining(config).to(device).train()
    models = {"dense BERT-base": (dense, config)}
    for name, heads, ratio, multiple in TICKETS:
        ticket = synthetic_ticket(config, heads, ratio, multiple)
        pruned = prune(dense, ticket)
        models[name] = (pruned, pruned.config)
    batch = make_batch(config, args.batch, args.seq, device)
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_index in range(args.warmup + args.iters):
        for name, (model, _) in models.items():
            seconds = training_step(model, batch, device, clock)
            if round_index >= args.warmup:
                times[name].append(seconds)
    dense_seconds = min(times["dense BERT-base"])
    dense_flops = flops_per_token(config, args.seq)
    print(f"BERT-base fwd+bwd, batch {args.batch}, seq {args.seq}, {args.device}, torch threads {args.threads}, "
          f"{args.clock} clock, best of {args.iters} steps (after {args.warmup} warm-up)")
    print("| model | FFN widths (min-max) | step s | measured ratio | FLOP ratio | measured / FLOP |")
    print("|---|---|---|---|---|---|")
    for name, (_, model_config) in models.items():
        seconds = min(times[name])
        measured, predicted = seconds / dense_seconds, flops_per_token(model_config, args.seq) / dense_flops
        widths = f"{min(model_config.ffn_per_layer)}-{max(model_config.ffn_per_layer)}"
        print(f"| {name} | {widths} | {seconds:.3f} | {measured:.3f} | {predicted:.3f} | {measured / predicted:.3f} |")


if __name__ == "__main__":
    main()
