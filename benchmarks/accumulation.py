"""Gradient accumulation in bf16 on the CPU: N accumulated micro-batches vs one big batch vs an fp32 reference.

Two DeepSpeed bf16 paths at ZeRO 0 with LAMB: "old", DeepSpeed's ``bf16`` section (bf16 parameters and bf16 ``.grad``,
fp32 masters in the optimizer), and "new", what ``train/engine.py`` builds (bf16 autocast over fp32 parameters, fp32
``.grad``); fp32 as a control. Each row is one global batch of GLOBAL sequences split into N micro-batches; the error
is ||g - g_ref|| / ||g_ref|| per parameter tensor (max, median and the worst tensor), g_ref the fp32 gradient of the
whole batch in one pass without DeepSpeed. Tensors whose true gradient is 0 are left out: the attention key biases
(softmax ignores a shift), whose fp32 reference is rounding noise (||g_ref|| < 1e-6 of the whole gradient). Every
position is labelled and no sequence is padded, so the mean of the micro-batch losses is the big-batch loss.
Run: .venv/bin/python benchmarks/accumulation.py
"""

from __future__ import annotations

import os
import statistics

import torch

from earlybert_pretrain.config import OptimizerConfig
from earlybert_pretrain.model.bert import BertConfig, BertForPreTraining
from earlybert_pretrain.train.engine import build_engine, deepspeed_config, init_distributed, precision_path
from earlybert_pretrain.train.optim import build_optimizer

GLOBAL, SEQ, VOCAB = 64, 32, 512
PATHS = ("fp32", "old bf16", "new bf16")


def tiny_model() -> BertForPreTraining:
    torch.manual_seed(0)
    return BertForPreTraining(BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=SEQ, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, slimming=True))


def global_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (GLOBAL, SEQ), generator=generator)
    return {"input_ids": ids, "labels": ids.roll(1, dims=1),
            "next_sentence_label": torch.randint(0, 2, (GLOBAL,), generator=generator)}


def reference_gradients(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp32, one pass over the whole batch, no DeepSpeed."""
    model = tiny_model()
    model(**batch).loss.backward()
    return {name: param.grad.clone() for name, param in model.named_parameters()}


def build(path: str, micro_batches: int):
    """A DeepSpeed engine for ``path`` with GLOBAL / ``micro_batches`` sequences per micro-batch."""
    model = tiny_model()
    optimizer, _ = build_optimizer(model, OptimizerConfig(), 1e-3)
    config = deepspeed_config(GLOBAL, GLOBAL // micro_batches, 1, "fp32" if path == "fp32" else "bf16", 0.0, 0,
                              "lamb")
    if path == "old bf16":  # DeepSpeed's own bf16 mode, as train/engine.py built it before
        config.update(bf16={"enabled": True}, torch_autocast={"enabled": False})
    return build_engine(model, optimizer, None, config)


def accumulated_gradients(engine, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Forward/backward over the engine's micro-batches without the optimizer step; the accumulated ``.grad``
    (DeepSpeed divides each micro-batch loss by the accumulation steps), as fp32."""
    micro = engine.train_micro_batch_size_per_gpu()
    for start in range(0, GLOBAL, micro):
        engine.backward(engine(**{key: value[start:start + micro] for key, value in batch.items()}).loss)
    return {name: param.grad.float().clone() for name, param in engine.module.named_parameters()}


def relative_errors(gradients: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """||g - g_ref|| / ||g_ref|| for every parameter tensor with a non-zero true gradient."""
    floor = 1e-6 * torch.stack([ref.norm() for ref in reference.values()]).norm()
    return {name: float((gradients[name] - ref).norm() / ref.norm()) for name, ref in reference.items()
            if ref.norm() > floor}


def measure(path: str, micro_batches: int, batch: dict[str, torch.Tensor],
            reference: dict[str, torch.Tensor]) -> tuple[str, dict[str, float]]:
    """(the engine's precision path, per-tensor relative errors) for one row of the table."""
    engine = build(path, micro_batches)
    try:
        return precision_path(engine), relative_errors(accumulated_gradients(engine, batch), reference)
    finally:
        engine.destroy()


def main(counts: tuple[int, ...] = (1, 8, 32)) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_distributed()
    batch = global_batch()
    reference = reference_gradients(batch)
    print(f"global batch {GLOBAL} x seq {SEQ}; error vs fp32 one-pass gradient, per parameter tensor")
    print(f"{'path':9s} {'N':>3s} {'max rel err':>12s} {'median':>10s}  {'worst tensor':44s} precision path")
    for path in PATHS:
        for count in counts:
            description, errors = measure(path, count, batch, reference)
            worst = max(errors, key=errors.get)
            print(f"{path:9s} {count:3d} {errors[worst]:12.2e} {statistics.median(errors.values()):10.2e}  "
                  f"{worst:44s} {description}")


if __name__ == "__main__":
    main()
