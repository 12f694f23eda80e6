"""One rank of the 2-rank ZeRO LAMB checks (launched by tests/test_zero_lamb.py with RANK / WORLD_SIZE / MASTER_*).

``compare OUT``: the same 10 steps (uneven pruned geometry, accumulation 2, clipping) at ZeRO 0, 1, 2, 2 with
round-robin partitions, 2 with DeepSpeed's per-partition ratios, ZeRO 0 and 2 in bf16 and ZeRO 1 and 2 in fp16
(autocast + loss scaling on the CPU twin of the GPU path), then one overflowing fp16 ZeRO-2 step; rank 0 saves every
run's final weights and optimizer-state bytes to OUT. A wider model trains first, so the runs are later, smaller
engines in one process.
``train OUT CKPT``: ZeRO 2, checkpoints every 5 steps, resumed from CKPT when one is there, then handed off to a
new stage (save_handoff / load_handoff); rank 0 saves the final weights and whether every rank's next stage started
from the same fp32 partitions, moments and weights to OUT (the test SIGKILLs a first run mid-way).
"""

import dataclasses
import logging
import sys
from pathlib import Path

import torch

import earlybert_pretrain.train.stage as stage_module
from earlybert_pretrain.config import OptimizerConfig
from earlybert_pretrain.model.bert import BertConfig, BertForPreTraining
from earlybert_pretrain.train.distributed import from_every_rank
from earlybert_pretrain.train.engine import init_distributed, loss_scaler, resolve_precision
from earlybert_pretrain.train.stage import Runtime, Schedule, Stage, StageSettings

STEPS = 10


def model(heads=(2, 1), ffn=(24, 13)) -> BertForPreTraining:
    torch.manual_seed(0)
    return BertForPreTraining(BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, heads_per_layer=list(heads), ffn_per_layer=list(ffn), slimming=True,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))


def batches_from(rank: int):
    def open_batches(start: int):
        index = start
        while True:
            generator = torch.Generator().manual_seed(1000 * rank + index)
            ids = torch.randint(1, 64, (2, 12), generator=generator)
            labels = torch.full_like(ids, -100)
            labels[:, 3], labels[:, 8] = ids[:, 3], ids[:, 8]
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                   "next_sentence_label": torch.randint(0, 2, (2,), generator=generator)}
            index += 1
    return open_batches


def settings(name: str, zero_stage: int, checkpoint_dir: Path | None = None) -> StageSettings:
    return StageSettings(name=name, seed=7, global_batch_size=8, micro_batch_size=2, optimizer=OptimizerConfig(),
                         lr=5e-2, schedule=Schedule(total_steps=STEPS, warmup=0.2), grad_clip=0.5,
                         zero_stage=zero_stage, checkpoint_dir=checkpoint_dir, checkpoint_every=5, log_every=1)


def weights(stage: Stage) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().float().clone() for name, tensor in stage.module.state_dict().items()}


def tensors_in_partition(stage: Stage) -> list[list[int]]:
    """Per param group, the tensors this rank holds fragments of (a tensor on both ranks is split between them)."""
    layouts = stage.engine.optimizer.optimizer.partition_layouts.values() if stage.settings.zero_stage else ()
    return [sorted(set(layout.owners.tolist())) for layout in layouts]


def with_round_robin(make_config):
    def config(*args):
        result = make_config(*args)
        result["zero_optimization"]["round_robin_gradients"] = True
        return result
    return config


def compare(runtime: Runtime, out: Path) -> None:
    with Stage.build(model(heads=(2, 2), ffn=(32, 32)), settings("wide", 2), runtime) as stage:
        stage.run(batches_from(runtime.rank), 2)
    results = {}
    plain_config = stage_module.deepspeed_config
    for name, zero_stage in (("zero0", 0), ("zero1", 1), ("zero2", 2), ("zero2_round_robin", 2),
                             ("zero2_per_partition", 2), ("zero0_bf16", 0), ("zero2_bf16", 2), ("zero1_fp16", 1),
                             ("zero2_fp16", 2)):
        stage_module.deepspeed_config = with_round_robin(plain_config) if "round_robin" in name else plain_config
        precision = name.rpartition("_")[2]
        on = dataclasses.replace(runtime, precision=precision) if precision in ("bf16", "fp16") else runtime
        with Stage.build(model(), settings(name, zero_stage), on) as stage:
            if name == "zero2_per_partition":  # what DeepSpeed gives a plain LAMB: one ratio per flat partition
                stage.engine.optimizer.optimizer.partition_layouts = {}
            result = stage.run(batches_from(runtime.rank), STEPS)
            results[name] = {"weights": weights(stage), "timing": result.timing,
                             "digests": result.parameter_digests_by_rank, "parameters": result.parameters,
                             "optimizer_parameters": result.optimizer_parameters,
                             "tensors_by_rank": from_every_rank(tensors_in_partition(stage)),
                             "grad_norm": float(stage.engine.get_global_grad_norm() or 0.0),
                             "skipped_steps": stage.engine.skipped_steps}
    stage_module.deepspeed_config = plain_config
    results["zero2_fp16_overflow"] = overflow_step(runtime)
    if runtime.is_main:
        torch.save(results, out)


def overflow_step(runtime: Runtime) -> dict:
    """fp16 under ZeRO 2: one step at loss scale 2^40 overflows; what each rank did about it."""
    with Stage.build(model(), settings("overflow", 2), dataclasses.replace(runtime, precision="fp16")) as stage:
        before = weights(stage)
        scaler = loss_scaler(stage.engine)
        scaler.load_state_dict({**scaler.state_dict(), "scale": 2.0**40})
        batches = batches_from(runtime.rank)(0)
        stage.train_step([next(batches) for _ in range(stage.accumulation_steps)])
        unchanged = all(torch.equal(tensor, before[name]) for name, tensor in weights(stage).items())
        return {"skipped_by_rank": from_every_rank(stage.engine.skipped_steps),
                "scale_by_rank": from_every_rank(scaler.get_scale()), "unchanged_by_rank": from_every_rank(unchanged)}


def optimizer_state(stage: Stage) -> list[torch.Tensor]:
    """This rank's fp32 partitions and LAMB moments, in group order."""
    inner = stage.engine.optimizer.optimizer
    partitions = [group["params"][0] for group in inner.param_groups]
    return [tensor.clone() for p in partitions
            for tensor in (p, inner.state[p]["exp_avg"], inner.state[p]["exp_avg_sq"])]


def train(runtime: Runtime, out: Path, checkpoint_dir: Path) -> None:
    """Then hand the result off to a next stage, which must start from the same partitions and moments."""
    geometry = {"heads": [2, 1], "ffn": [24, 13]}
    with Stage.build(model(), settings("resumable", 2, checkpoint_dir), runtime) as stage:
        stage.resume()
        stage.run(batches_from(runtime.rank), STEPS)
        final, before = weights(stage), optimizer_state(stage)
        stage.save_handoff("handoff", geometry)
    with Stage.build(model(), settings("next", 2, checkpoint_dir), runtime) as stage:
        stage.load_handoff("handoff", geometry)
        after = optimizer_state(stage)
        same = len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before))
        handed_off = all(torch.equal(tensor, final[name]) for name, tensor in weights(stage).items())
        exact_on_every_rank = from_every_rank(same and handed_off)
    if runtime.is_main:
        torch.save({"weights": final, "handoff_exact_by_rank": exact_on_every_rank}, out)


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s", force=True)
    rank, world_size, device = init_distributed()
    runtime = Runtime(rank, world_size, device, resolve_precision("fp32", device))
    if sys.argv[1] == "compare":
        compare(runtime, Path(sys.argv[2]))
    else:
        train(runtime, Path(sys.argv[2]), Path(sys.argv[3]))


if __name__ == "__main__":
    main()
