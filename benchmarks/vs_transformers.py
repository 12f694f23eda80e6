"""Our BERT vs transformers.BertForPreTraining (SDPA attention), BERT-base geometry, same weights and batch.

    python benchmarks/vs_transformers.py [--threads 1] [--rounds 3] [--layers 12]

Forward + backward with MLM labels on 15% of the real tokens and NSP, on two batches: full-length rows at seq 128
(batch 8), and a seq-512 batch (batch 2) with half of its positions padding, as full Wikipedia's many short articles
give at phase 2 (Graphcore, arXiv 2107.02027). Ours runs padded (``model.unpad=false``) and unpadded
(``model.unpad=true``). Each model's best round of CPU-seconds of this process is used (with one thread, other jobs on
the machine do not enter it); the models alternate within every round. Prints the speed-up of ours over transformers
and checks the losses agree first (the comparison is only fair for the same function).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import transformers

from earlybert_pretrain.model.bert import BertConfig, BertForPreTraining

IGNORE = -100


def batch(rows: int, seq: int, real_fraction: float, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens; each row keeps ``real_fraction`` of its positions on average (lengths spread around it)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, vocab, (rows, seq), generator=generator)
    lengths = [seq] * rows if real_fraction >= 1.0 else [
        max(8, min(seq, int(seq * real_fraction * (0.5 + row / max(1, rows - 1))))) for row in range(rows)]
    attention_mask = torch.zeros(rows, seq, dtype=torch.long)
    token_type_ids = torch.zeros(rows, seq, dtype=torch.long)
    labels = torch.full((rows, seq), IGNORE)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
        token_type_ids[row, length // 2:length] = 1
        input_ids[row, length:] = 0
        masked = torch.randperm(length, generator=generator)[: max(1, int(0.15 * length))]
        labels[row, masked] = input_ids[row, masked]
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
            "labels": labels, "next_sentence_label": torch.randint(0, 2, (rows,), generator=generator)}


def models(layers: int) -> dict[str, torch.nn.Module]:
    """transformers' BERT-base (SDPA) and ours with its weights, padded and unpadded; dropout off for equal losses."""
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(num_hidden_layers=layers, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    reference = transformers.BertForPreTraining(hf_config).train()
    built = {"transformers": reference}
    for unpad in (False, True):
        config = BertConfig.from_hf(hf_config)
        config.unpad = unpad
        ours = BertForPreTraining(config).train()
        ours.load_state_dict(reference.state_dict())
        built[f"ours, unpad={str(unpad).lower()}"] = ours
    return built


def step(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    model.zero_grad(set_to_none=True)
    output = model(**inputs)
    output.loss.backward()
    return float(output.loss.detach())


def cpu_seconds(fn: Callable[[], object]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def compare(built: dict[str, torch.nn.Module], inputs: dict[str, torch.Tensor], rounds: int) -> dict[str, float]:
    """Best-of-``rounds`` CPU seconds per model, after checking that every model computes the same loss."""
    losses = {name: step(model, inputs) for name, model in built.items()}  # also the warm-up
    reference = losses["transformers"]
    for name, loss in losses.items():
        if abs(loss - reference) > 1e-4 * max(1.0, abs(reference)):
            raise SystemExit(f"{name}: loss {loss:.6f} differs from transformers' {reference:.6f}")
    best = dict.fromkeys(built, float("inf"))
    for _ in range(rounds):
        for name, model in built.items():
            best[name] = min(best[name], cpu_seconds(lambda model=model: step(model, inputs)))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    built = models(args.layers)
    vocab = built["transformers"].config.vocab_size
    cases = {"seq 128, batch 8, no padding": batch(8, 128, 1.0, vocab),
             "seq 512, batch 2, 50% padding": batch(2, 512, 0.5, vocab)}
    print(f"BERT-base geometry, {args.layers} layers, fwd+bwd, {args.threads} thread(s), best of {args.rounds} "
          "rounds, CPU seconds")
    print(f"{'batch':32} {'model':22} {'seconds':>8} {'speed-up vs transformers':>26}")
    for label, inputs in cases.items():
        padding = 1.0 - float(inputs["attention_mask"].float().mean())
        best = compare(built, inputs, args.rounds)
        for name, seconds in best.items():
            print(f"{label:32} {name:22} {seconds:8.3f} {best['transformers'] / seconds:25.2f}x")
        print(f"{'':32} (padding {padding:.0%} of the positions)")


if __name__ == "__main__":
    main()
