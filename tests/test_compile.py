"""engine.compile=true: the Stage trains a torch.compile'd encoder on the CPU, step for step like the eager one.

Slow: the first compile of even a tiny BERT takes ~50 s on this machine's CPU (inductor + gcc), so it is marked slow.
"""

from __future__ import annotations

import pytest
import torch

from earlybert_pretrain.config import OptimizerConfig
from earlybert_pretrain.model.bert import BertConfig, BertForPreTraining
from earlybert_pretrain.train.stage import Runtime, Schedule, Stage, StageSettings

STEPS, SEQ, VOCAB = 4, 24, 64
# Measured on this machine (fp32, 4 steps): losses within 4.8e-7 and weights within 1.2e-7 of eager; inductor's
# fused kernels reorder float sums, so equality is to rounding, not bitwise.
LOSS_BOUND, WEIGHT_BOUND = 1e-5, 1e-5


def tiny_model() -> BertForPreTraining:
    """Dropout off: inductor draws its own random numbers (not eager's generator), so with dropout on the two runs
    would differ by the masks, not by compilation."""
    torch.manual_seed(0)
    return BertForPreTraining(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=SEQ, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def padded_batches(start: int):
    """Fixed-shape micro-batches with padding (one graph) and ~15% masked positions, as pre-training feeds them."""
    index = start
    while True:
        generator = torch.Generator().manual_seed(index)
        ids = torch.randint(5, VOCAB, (2, SEQ), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, SEQ - 7:] = 0
        ids[1, SEQ - 7:] = 0
        labels = torch.where((torch.rand(ids.shape, generator=generator) < 0.15) & (mask == 1), ids, -100)
        labels[0, 1] = ids[0, 1]  # at least one masked position per batch
        yield {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask, "labels": labels,
               "next_sentence_label": torch.randint(0, 2, (2,), generator=generator)}
        index += 1


def train(compiled: bool) -> tuple[list[float], dict[str, torch.Tensor], bool]:
    settings = StageSettings(name="phase1", seed=3, global_batch_size=4, micro_batch_size=2,
                             optimizer=OptimizerConfig(), lr=1e-2, schedule=Schedule(total_steps=STEPS, warmup=0.25),
                             grad_clip=1.0, compile=compiled)
    with Stage.build(tiny_model(), settings, Runtime(0, 1, torch.device("cpu"), "fp32")) as stage:
        result = stage.run(padded_batches, STEPS)
        weights = {name: p.detach().clone() for name, p in stage.module.named_parameters()}
        return result.losses, weights, stage.description["torch_compile"]


@pytest.mark.slow
def test_compiled_encoder_trains_like_eager(single_process_dist):
    eager_losses, eager_weights, eager_compiled = train(compiled=False)
    losses, weights, compiled = train(compiled=True)
    assert compiled and not eager_compiled
    assert len(losses) == STEPS and losses[-1] < losses[0]
    assert max(abs(a - b) for a, b in zip(losses, eager_losses)) < LOSS_BOUND, (losses, eager_losses)
    deviation = max((weights[name] - eager_weights[name]).abs().max().item() for name in weights)
    assert deviation < WEIGHT_BOUND, deviation
