"""Unpadded vs padded BERT training step (forward, backward, LAMB step), beside the padding the unpadded one skips.

    python benchmarks/unpadded.py [--shard-dir SHARDS] [--layers 2] [--rounds 2] [--threads 1]

Three length distributions: the Wikipedia sample's at seq 128 and seq 512 (real micro-batches from ``--shard-dir``,
e.g. the shards `earlybert-prep all` builds from the sample; without it, synthetic lengths with the sample's measured
padding, 4% at seq 128 and 9% at seq 512, ../shared/FACTS.md), and a full-Wikipedia-like one at seq 512 with ~50%
padding (Graphcore, arXiv 2107.02027). Both models are BERT-base layers (hidden 768, 12 heads, FFN 3072, vocab
30522; ``--layers`` of them, so it runs in minutes on a CPU), twins of the same initial weights, dropout 0.1, one
LAMB optimizer each; they differ only in ``model.unpad``. Each round runs every micro-batch of the set through both
models in turn (interleaved, so drift on a shared machine hits both); each micro-batch counts with its fastest time.
The clock is this process's CPU time (``time.process_time``): with one thread other jobs do not add to it (they
still slow it a little through shared caches and memory bandwidth).

Three tables, per distribution: the whole training step; one encoder layer's forward and backward on the same
shapes (the part a 12-layer BERT-base has six times more of than the default 2 layers); and a 12-layer step projected
from the two (the measured step plus 10 layers: an estimate, not a measurement). Columns: the padding fraction of
the tokens, seconds of both, the time unpadding saves (1 - unpadded / padded) and its ratio to the padding fraction
(1.0 = every padded token cost its full share; the embeddings' dense gradient and the optimizer step do not shrink
with padding, which is what holds the shallow full step below the per-layer ratio).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch

from earlybert_pretrain.common.tokens import IGNORE_INDEX
from earlybert_pretrain.config import OptimizerConfig
from earlybert_pretrain.model.bert import BertConfig, BertForPreTraining, BertLayer
from earlybert_pretrain.model.unpad import Packing
from earlybert_pretrain.pretrain.batches import PretrainingBatches, ShardedCorpus
from earlybert_pretrain.train.optim import build_optimizer

Batch = dict[str, torch.Tensor]
# (name, seq len, micro-batch size, synthetic padding fraction, real lengths from --shard-dir when given)
DISTRIBUTIONS = (("sample, seq 128", 128, 8, 0.04, True), ("sample, seq 512", 512, 2, 0.09, True),
                 ("Wikipedia-like, seq 512", 512, 2, 0.50, False))
BATCHES_PER_SET = 4
MIN_LENGTH = 8
VARIANTS = ("padded", "unpadded")


def synthetic_lengths(seq: int, count: int, padding: float, generator: torch.Generator) -> torch.Tensor:
    """Row lengths with about ``padding`` of the tokens padding: row i pads (seq - MIN_LENGTH) * u_i^k tokens, u_i
    the evenly spaced quantiles (shuffled), k set so the mean is ``padding``. A small padding gives mostly full rows
    and a few short ones (BERT's short and end-of-document examples); ~50% gives uniform lengths."""
    k = max(0.0, (seq - MIN_LENGTH) / (seq * padding) - 1.0)  # the mean of u^k over [0, 1] is 1 / (k + 1)
    quantiles = (torch.arange(count) + 0.5) / count
    pad = ((seq - MIN_LENGTH) * quantiles[torch.randperm(count, generator=generator)] ** k).long()
    return seq - pad


def synthetic_batch(lengths: torch.Tensor, seq: int, vocab: int, generator: torch.Generator) -> Batch:
    """Random tokens in the real positions, 15% of them predicted (at most 20 per 128 positions), random NSP."""
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    ids = torch.randint(1000, vocab, (len(lengths), seq), generator=generator) * mask
    score = torch.rand(len(lengths), seq, generator=generator).masked_fill(mask == 0, 2.0)
    predicted = score.argsort(dim=1)[:, : seq * 20 // 128]
    chosen = torch.zeros_like(mask, dtype=torch.bool).scatter_(1, predicted, True) & (score < 0.15)
    labels = torch.where(chosen, ids, IGNORE_INDEX)
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask, "labels": labels,
            "next_sentence_label": torch.randint(0, 2, (len(lengths),), generator=generator)}


def batch_set(seq: int, size: int, padding: float, shard_dir: Path | None, vocab: int) -> list[Batch]:
    if shard_dir is not None:
        stream = iter(PretrainingBatches(ShardedCorpus(shard_dir), seq, seq * 20 // 128, size, seed=0))
        return [next(stream) for _ in range(BATCHES_PER_SET)]
    generator = torch.Generator().manual_seed(seq)
    return [synthetic_batch(synthetic_lengths(seq, size, padding, generator), seq, vocab, generator)
            for _ in range(BATCHES_PER_SET)]


def training_step(model: BertForPreTraining, optimizer: torch.optim.Optimizer, batch: Batch) -> float:
    """CPU seconds of one optimizer step on one micro-batch."""
    start = time.process_time()
    optimizer.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    optimizer.step()
    return time.process_time() - start


def layer_step(layer: BertLayer, batch: Batch, unpadded: bool) -> float:
    """CPU seconds of one encoder layer's forward and backward on the batch's shape and padding."""
    mask = batch["attention_mask"].bool()
    hidden = torch.randn(*mask.shape, layer.output.dense.out_features)
    start = time.process_time()
    if unpadded:
        packing = Packing.from_mask(mask, mask.sum(1).tolist())
        hidden = packing.gather(hidden).requires_grad_()
        layer(hidden, packing).sum().backward()
    else:
        hidden.requires_grad_()
        layer(hidden, mask[:, None, None, :]).sum().backward()
    return time.process_time() - start


def fastest(run: Callable[[str, Batch], float], batches: list[Batch], rounds: int) -> dict[str, float]:
    """Mean over the batches of each variant's fastest time on that batch. After one warm-up step each, the
    variants alternate on every batch, so load from other jobs hits both alike."""
    for name in VARIANTS:
        run(name, batches[0])
    times = {name: [[] for _ in batches] for name in VARIANTS}
    for _ in range(rounds):
        for index, batch in enumerate(batches):
            for name in VARIANTS:
                times[name][index].append(run(name, batch))
    return {name: sum(min(values) for values in per_batch) / len(batches) for name, per_batch in times.items()}


def row(name: str, batches: list[Batch], seconds: dict[str, float]) -> str:
    masks = torch.cat([batch["attention_mask"] for batch in batches])
    padding = 1.0 - masks.float().mean().item()
    saved = 1.0 - seconds["unpadded"] / seconds["padded"]
    shape = f"{batches[0]['input_ids'].shape[0]} x {masks.shape[1]}"
    return (f"| {name} | {shape} | {padding:.1%} | {seconds['padded']:.3f} | {seconds['unpadded']:.3f} | "
            f"{saved:.1%} | {saved / padding:.2f} |")


def projected(step: dict[str, float], layer: dict[str, float], layers: int, depth: int) -> dict[str, float]:
    """A ``depth``-layer step: the measured step's part that is not encoder layers, plus ``depth`` layers."""
    return {name: step[name] + (depth - layers) * layer[name] for name in VARIANTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shard-dir", type=Path, help="real micro-batches for the sample distributions")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=args.layers, unpad=False)
    models = {"padded": BertForPreTraining(config).train()}
    models["unpadded"] = copy.deepcopy(models["padded"])
    models["unpadded"].config.unpad = True
    optimizers = {name: build_optimizer(model, OptimizerConfig(), 1e-4)[0] for name, model in models.items()}
    layer = BertLayer(config, config.num_attention_heads, config.intermediate_size).train()
    sets = [(f"{name} ({'real' if real and args.shard_dir else 'synthetic'})",
             batch_set(seq, size, padding, args.shard_dir if real else None, config.vocab_size))
            for name, seq, size, padding, real in DISTRIBUTIONS]
    print(f"CPU seconds per micro-batch, torch threads {args.threads}, mean over {BATCHES_PER_SET} micro-batches of "
          f"each one's fastest of {args.rounds} interleaved rounds")
    steps = [fastest(lambda name, batch: training_step(models[name], optimizers[name], batch), batches, args.rounds)
             for _, batches in sets]
    layers = [fastest(lambda name, batch: layer_step(layer, batch, name == "unpadded"), batches, args.rounds)
              for _, batches in sets]
    for title, results in (
            (f"Training step (fwd+bwd+LAMB), BERT-base geometry with {args.layers} layers", steps),
            ("One BERT-base encoder layer (fwd+bwd), the part that grows with depth", layers),
            (f"Projected 12-layer training step: the {args.layers}-layer step plus {12 - args.layers} layers",
             [projected(step, one, args.layers, 12) for step, one in zip(steps, layers)])):
        print(f"\n{title}\n")
        print("| distribution | batch x seq | padding | padded s | unpadded s | time saved | saved / padding |")
        print("|---|---|---|---|---|---|---|")
        for (name, batches), seconds in zip(sets, results):
            print(row(name, batches, seconds))

if __name__ == "__main__":
    main()
