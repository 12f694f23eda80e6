"""``earlybert-pretrain --dry-run``: the plan's arithmetic against hand-computed values for BERT-base and -large,
the memory estimate's parts, the fit warning with the largest micro-batch that fits, and nothing created."""

import dataclasses

import pytest

from earlybert_pretrain.config import PretrainConfig, load_config
from earlybert_pretrain.model.bert import parameter_counts
from earlybert_pretrain.pretrain import dry_run
from earlybert_pretrain.pretrain.cli import main

GIB = 1024**3


def _flops_per_token(layers: int, hidden: int, heads: list[int], ffn: list[int], seq: int, vocab: int = 30522) -> float:
    """Training FLOPs per token by hand: 3 x forward matmuls (Q/K/V/O 8h*kept, scores 4*s*kept, FFN 4hf), the MLM
    head on the max_predictions positions (20 of 128, 80 of 512: 15.625%), pooler + NSP once per sequence."""
    head_size = 64
    forward = sum(8 * hidden * k * head_size + 4 * seq * k * head_size for k in heads)
    forward += sum(4 * hidden * f for f in ffn)
    forward += 0.15625 * 2 * (hidden * hidden + hidden * vocab) + 2 * (hidden * hidden + 2 * hidden) / seq
    return 3 * forward


@pytest.mark.parametrize("size, layers, hidden, heads_kept, ffn_kept, micro", [
    # BERT-base: 4 of 12 heads and 30% of 12 x 3072 FFN neurons pruned (Sec. 4.1), widths multiples of 8
    ("base", 12, 768, 8, 25808, (64, 16)),
    # BERT-large: 6 of 16 heads, 30% of 24 x 4096 (configs/pretrain_bert_large.yaml)
    ("large", 24, 1024, 10, 68816, (32, 8)),
])
def test_plan_matches_hand_computed_steps_accumulation_and_flops(size, layers, hidden, heads_kept, ffn_kept, micro):
    cfg = load_config(PretrainConfig, f"configs/pretrain_bert_{size}.yaml")
    plans = {item.name: item for item in dry_run.plan(cfg, world_size=64)}
    assert list(plans) == ["search", "phase1", "phase2"]
    # 8,601 steps, 9/10 at seq 128 (Sec. 4.1): 7,741 + 860 dense; the ticket trains 80% of each (Sec. 4.3).
    assert [plans[n].steps for n in plans] == [400, round(0.8 * 7741), round(0.8 * 860)] == [400, 6193, 688]
    assert plans["phase1"].accumulation == 65536 // (micro[0] * 64) and plans["phase2"].accumulation == 32768 // (
        micro[1] * 64)
    geometry = dry_run.trained_geometry(cfg)
    assert geometry.heads_per_layer == [heads_kept] * layers and sum(geometry.ffn_per_layer) == ffn_kept
    dense_ffn = [4 * hidden] * layers
    search = 400 * 65536 * 128 * _flops_per_token(layers, hidden, [hidden // 64] * layers, dense_ffn, 128)
    phase1 = 6193 * 65536 * 128 * _flops_per_token(layers, hidden, geometry.heads_per_layer,
                                                    geometry.ffn_per_layer, 128)
    phase2 = 688 * 32768 * 512 * _flops_per_token(layers, hidden, geometry.heads_per_layer,
                                                  geometry.ffn_per_layer, 512)
    for name, expected in (("search", search), ("phase1", phase1), ("phase2", phase2)):
        assert plans[name].flops == pytest.approx(expected, rel=1e-9)
    if size == "base":  # the 0.546 GFLOP/token of FACTS.md for dense BERT-base at seq 128
        assert search / (400 * 65536 * 128) == pytest.approx(546_320_232, rel=1e-9)


def test_memory_parts_by_hand_for_bert_base():
    cfg = load_config(PretrainConfig, "configs/pretrain_bert_base.yaml", ["mode=dense", "engine.zero_stage=0"])
    parameters = parameter_counts(cfg.model)["total"]
    assert parameters == 110_106_428
    memory = dry_run.memory_estimate(cfg, world_size=8, precision="fp16")["phase1"]
    assert memory["weights"] == memory["gradients"] == 4 * parameters and memory["optimizer_state"] == 8 * parameters
    assert memory["buckets"] == 4 * parameters  # ZeRO 0: DeepSpeed's flat all-reduce copy of the gradients
    b, s, h, f = 64, 128, 768, 3072  # fp16: 2-byte activations, 1-byte dropout masks, no s x s (efficient SDPA)
    per_layer = 2 * s * b * (2 * h + 4 * h) + s * b * h + 2 * s * b * (h + 2 * f) + s * b * h + 2 * 2 * s * b * h
    expected = 2 * s * b * h + s * b * h + 12 * per_layer + 3 * 4 * b * 20 * 30522
    assert memory["activations"] == expected
    # ZeRO 2 on 8 ranks: gradients and moments + fp32 master partitioned, DeepSpeed's two buckets counted.
    zero = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, zero_stage=2))
    sharded = dry_run.memory_estimate(zero, world_size=8, precision="fp16")["phase1"]
    shard = -(-parameters // 8)
    assert sharded["gradients"] == 4 * shard and sharded["optimizer_state"] == 12 * shard
    assert sharded["buckets"] == 4 * (cfg.engine.reduce_bucket_size + cfg.engine.allgather_bucket_size)
    assert sharded["activations"] == memory["activations"]
    # fp32 doubles the activations and keeps the math kernel's s x s matrices.
    assert dry_run.memory_estimate(cfg, 8, "fp32")["phase1"]["activations"] > 2 * memory["activations"]


def test_the_largest_micro_batch_that_fits_is_advised(capsys, tmp_path):
    out = tmp_path / "run"
    args = ["--config", "configs/pretrain_bert_large.yaml", "--dry-run", "--world-size", "8", "--gpu", "V100-16GB",
            "phase2.micro_batch_size=64", "engine.precision=fp16", f"output_dir={out}"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "world size 8, V100-16GB (15.8 GiB), precision fp16" in printed
    cfg = load_config(PretrainConfig, "configs/pretrain_bert_large.yaml",
                      ["phase2.micro_batch_size=64", "engine.precision=fp16"])
    capacity = 16_160 * 1024**2
    best = dry_run.largest_micro_batch(cfg, 8, "fp16", "phase2", capacity)
    assert "WARNING: phase2 needs" in printed and f"phase2.micro_batch_size={best}" in printed
    assert 0 < best < 64 and (32768 // 8) % best == 0
    assert dry_run.memory_estimate(cfg, 8, "fp16", {"phase2": best})["phase2"]["total"] <= capacity
    assert dry_run.memory_estimate(cfg, 8, "fp16", {"phase2": 2 * best})["phase2"]["total"] > capacity
    assert "WARNING: phase1" not in printed  # micro-batch 32 at seq 128 fits
    assert not out.exists()


def test_auto_precision_follows_the_gpu_and_bad_flags_are_one_line(capsys):
    for gpu, precision in (("V100-32GB", "fp16"), ("A100-80GB", "bf16"), ("H200", "bf16")):
        assert main(["--config", "configs/pretrain_bert_base.yaml", "--dry-run", "--gpu", gpu]) == 0
        assert f"precision {precision}" in capsys.readouterr().out
    for extra, message in ((["--gpu", "RTX A1000"], "--gpu: unknown GPU 'RTX A1000'"),
                           (["--world-size", "0"], "--world-size: expected >= 1"),
                           (["--world-size", "3"], "not divisible by micro_batch_size x world size = 192"),
                           (["--gpu", "V100-16GB", "engine.precision=bf16"], "this GPU has no bf16")):
        assert main(["--config", "configs/pretrain_bert_base.yaml", "--dry-run", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
