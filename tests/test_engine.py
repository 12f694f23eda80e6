"""The DeepSpeed engine on CPU: config checks, gradient accumulation, exact checkpoint round trips, corrupt fallback."""

import copy
import json
import logging
import random

import numpy as np
import pytest
import torch

from earlybert_pretrain.common.files import sha256_file
from earlybert_pretrain.config import OptimizerConfig
from earlybert_pretrain.errors import ConfigError
from earlybert_pretrain.model.bert import BertConfig, BertForPreTraining
from earlybert_pretrain.train.checkpoint import (
    COMPLETE_MARKER,
    capture_rng_state,
    checkpoint_tag,
    complete_checkpoints,
    load_latest_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from earlybert_pretrain.train.engine import (
    build_engine,
    deepspeed_config,
    describe_runtime,
    resolve_precision,
)
from earlybert_pretrain.train.memory import memory_budget
from earlybert_pretrain.train.optim import build_optimizer
from earlybert_pretrain.train.schedules import build_scheduler

CPU = torch.device("cpu")


def tiny_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return BertForPreTraining(BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout))


def batches(count, size, seed=3):
    """Each sequence has exactly two masked positions, so a mean over micro-batches equals the big-batch mean."""
    generator = torch.Generator().manual_seed(seed)
    result = []
    for _ in range(count):
        ids = torch.randint(1, 64, (size, 12), generator=generator)
        labels = torch.full_like(ids, -100)
        labels[:, 2], labels[:, 7] = ids[:, 2], ids[:, 7]
        nsp = torch.randint(0, 2, (size,), generator=generator)
        result.append({"input_ids": ids, "labels": labels, "next_sentence_label": nsp})
    return result


def make_engine(model, global_batch=8, micro_batch=2, total_steps=6, lr=2e-2, precision="fp32"):
    optimizer, kernel = build_optimizer(model, OptimizerConfig(), lr)
    scheduler = build_scheduler(optimizer, total_steps, warmup_fraction=0.3)
    config = deepspeed_config(global_batch, micro_batch, 1, precision, 1.0, 0, "lamb")
    return build_engine(model, optimizer, scheduler, config), kernel


def train_steps(engine, global_batches):
    """One optimizer step per global batch, split into the engine's micro-batches."""
    micro = engine.train_micro_batch_size_per_gpu()
    losses = []
    for batch in global_batches:
        for start in range(0, batch["input_ids"].shape[0], micro):
            output = engine(**{key: value[start:start + micro] for key, value in batch.items()})
            engine.backward(output.loss)
            engine.step()
            losses.append(output.loss.item())
    return losses


def parameters(engine):
    return {name: p.detach().clone() for name, p in engine.module.named_parameters()}


def test_resolve_precision():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    assert resolve_precision("fp32", CPU) == "fp32"
    with pytest.raises(ConfigError, match="fp16.*use engine.precision=bf16"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ConfigError, match="engine.precision"):
        resolve_precision("int8", CPU)


@pytest.mark.parametrize("capability", [(7, 0), (8, 0), (9, 0)])
def test_resolve_precision_on_gpus_with_and_without_bf16(monkeypatch, capability):
    """A V100 (sm_70) passes torch's bf16 probe by emulation: the decision is the compute capability."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args, **kwargs: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation
                        or capability >= (8, 0))
    has_bf16 = capability >= (8, 0)
    gpu = torch.device("cuda", 0)
    assert resolve_precision("auto", gpu) == ("bf16" if has_bf16 else "fp16")  # V100: fp16 with loss scaling
    assert resolve_precision("fp16", gpu) == "fp16"
    if has_bf16:
        assert resolve_precision("bf16", gpu) == "bf16"
    else:
        with pytest.raises(ConfigError, match=r"^engine.precision=bf16: this GPU has no bf16 \(e.g. V100\); use "
                                              r"engine.precision=fp16$"):
            resolve_precision("bf16", gpu)


def test_deepspeed_config_derives_accumulation_and_refuses_bad_settings():
    config = deepspeed_config(65536, 64, 32, "fp16", 1.0, 0, "lamb")
    assert config["gradient_accumulation_steps"] == 32
    assert config["train_batch_size"] == 65536 and config["train_micro_batch_size_per_gpu"] == 64
    # fp16 = autocast over fp32 parameters (fp32 gradient accumulation), DeepSpeed's GradScaler for dynamic scaling
    assert config["torch_autocast"]["enabled"] and config["torch_autocast"]["dtype"] == "float16"
    assert not config["fp16"]["enabled"] and not config["bf16"]["enabled"] and config["gradient_clipping"] == 1.0
    assert config["zero_optimization"]["stage"] == 0
    with pytest.raises(ConfigError, match=r"\(100, phase\*.global_batch_size\).*\(8, phase\*.micro_batch_size\)"
                                                r".*\(3\)"):
        deepspeed_config(100, 8, 3, "fp32", 1.0, 0, "lamb")
    with pytest.raises(ConfigError, match="zero_stage=3 with LAMB"):  # 1 and 2: tests/test_zero_lamb.py
        deepspeed_config(64, 8, 1, "fp32", 1.0, 3, "lamb")
    assert deepspeed_config(64, 8, 1, "bf16", 1.0, 2, "adamw")["zero_optimization"]["stage"] == 2
    with pytest.raises(ValueError, match="resolve"):
        deepspeed_config(64, 8, 1, "auto", 1.0, 0, "lamb")


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_zero_buckets_come_from_the_engine_config_and_are_allocated_as_budgeted(single_process_dist, zero_stage):
    """DeepSpeed's 5e8-element default reduce bucket (2 GB of fp32) is never used: the config always names both
    sizes, the ZeRO optimizer takes them, and the reduce bucket it allocates is the bytes memory_budget counts."""
    config = deepspeed_config(8, 2, 1, "fp32", 1.0, zero_stage, "lamb")
    assert config["zero_optimization"] == {"stage": zero_stage, "reduce_bucket_size": 50_000_000,
                                           "allgather_bucket_size": 50_000_000}
    with pytest.raises(ConfigError, match=r"^engine.reduce_bucket_size: expected .* >= 1, got 0$"):
        deepspeed_config(8, 2, 1, "fp32", 1.0, zero_stage, "lamb", reduce_bucket_size=0)
    with pytest.raises(ConfigError, match=r"^engine.allgather_bucket_size: expected an even number .* got 1001$"):
        deepspeed_config(8, 2, 1, "fp32", 1.0, zero_stage, "lamb", allgather_bucket_size=1001)
    model = tiny_model(dropout=0.1)
    optimizer, _ = build_optimizer(model, OptimizerConfig(), 2e-2, zero_stage=zero_stage)
    engine = build_engine(model, optimizer, None, deepspeed_config(8, 2, 1, "fp32", 1.0, zero_stage, "lamb",
                                                                   reduce_bucket_size=3000, allgather_bucket_size=1000))
    allocated, setup = set(), engine.optimizer.setup_buckets

    def recording_setup() -> None:  # the buckets live during the backward pass only: look from inside it
        setup()
        allocated.add(tuple(buffer.numel() * buffer.element_size()
                            for bucket in engine.optimizer.ipg_buckets.values() for buffer in bucket.buffer))
    engine.optimizer.setup_buckets = recording_setup
    engine.backward(engine(**batches(1, 2)[0]).loss)
    parameters = sum(p.numel() for p in model.parameters())
    assert allocated == {(4 * 3000,)} and engine.optimizer.allgather_bucket_size == 1000
    assert memory_budget(parameters, 1, zero_stage, 3000, 1000)["buckets"] == 4 * (3000 + 1000)
    engine.destroy()


def test_gradient_accumulation_equals_one_big_batch_and_a_plain_loop(single_process_dist):
    data = batches(3, 8)
    accumulated, kernel = make_engine(tiny_model(), global_batch=8, micro_batch=2)
    assert accumulated.gradient_accumulation_steps() == 4
    big, _ = make_engine(tiny_model(), global_batch=8, micro_batch=8)
    train_steps(accumulated, data)
    train_steps(big, data)
    assert accumulated.global_steps == big.global_steps == 3

    # The same algorithm without DeepSpeed: clip the global norm to 1.0, LAMB step, schedule step.
    model = tiny_model()
    optimizer, _ = build_optimizer(model, OptimizerConfig(), 2e-2)
    scheduler = build_scheduler(optimizer, 6, warmup_fraction=0.3)
    grad_norms = []
    for batch in data:
        optimizer.zero_grad()
        model(**batch).loss.backward()
        grad_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item())
        optimizer.step()
        scheduler.step()
    assert max(grad_norms) > 1.0  # clipping really acted in this run

    plain = dict(model.named_parameters())
    big_params = parameters(big)
    for name, value in parameters(accumulated).items():
        torch.testing.assert_close(value, big_params[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(value, plain[name].detach(), rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(big_params["bert.pooler.dense.weight"], tiny_model().bert.pooler.dense.weight)

    runtime = describe_runtime(accumulated, kernel)
    assert runtime["precision"] == "fp32" and runtime["optimizer_kernel"] == "torch-foreach"
    assert runtime["gradient_accumulation_steps"] == 4 and runtime["world_size"] == 1
    assert runtime["layer_norm_kernel"] == "torch-native-layer-norm" and not runtime["torch_compile"]
    assert runtime["zero_stage"] == 0 and runtime["gradient_clipping"] == 1.0


def test_checkpoint_round_trip_resumes_bit_identically(single_process_dist, tmp_path):
    data = batches(5, 8)
    engine, _ = make_engine(tiny_model(dropout=0.1))
    train_steps(engine, data[:2])
    random.random(), np.random.rand()  # move every RNG, so restoring them matters
    client = {"stage": "phase1", "step": 2, "samples": 16, "rng": capture_rng_state()}
    save_checkpoint(engine, tmp_path, checkpoint_tag("phase1", 2), client, keep=2)
    saved_params = parameters(engine)
    saved_optimizer = copy.deepcopy(engine.optimizer.state_dict())
    saved_lr = engine.lr_scheduler.get_last_lr()
    python_draw, numpy_draw = random.random(), np.random.rand()
    losses = train_steps(engine, data[2:])
    expected = parameters(engine)

    torch.manual_seed(99)  # a different RNG state and different initial weights: everything must come from disk
    resumed, _ = make_engine(tiny_model(seed=7, dropout=0.1))
    client_state = load_latest_checkpoint(resumed, tmp_path)
    assert {k: client_state[k] for k in ("stage", "step", "samples")} == {"stage": "phase1", "step": 2, "samples": 16}
    for name, value in parameters(resumed).items():
        assert torch.equal(value, saved_params[name]), name
    state = resumed.optimizer.state_dict()
    for key, values in saved_optimizer["state"].items():
        assert state["state"][key]["step"] == values["step"] == 2
        assert torch.equal(state["state"][key]["exp_avg"], values["exp_avg"])
        assert torch.equal(state["state"][key]["exp_avg_sq"], values["exp_avg_sq"])
    assert resumed.lr_scheduler.get_last_lr() == saved_lr and resumed.global_steps == 2
    restore_rng_state(client_state["rng"])
    assert (random.random(), np.random.rand()) == (python_draw, numpy_draw)
    restore_rng_state(client_state["rng"])
    assert train_steps(resumed, data[2:]) == losses
    for name, value in parameters(resumed).items():
        assert torch.equal(value, expected[name]), name


def test_keep_prunes_old_tags_of_the_same_stage_only(single_process_dist, tmp_path):
    engine, _ = make_engine(tiny_model())
    save_checkpoint(engine, tmp_path, checkpoint_tag("search", 10), {"step": 10}, keep=2)
    (tmp_path / checkpoint_tag("phase1", 1)).mkdir()  # a crashed save of another stage: left alone
    for step in (1, 2, 3):
        save_checkpoint(engine, tmp_path, checkpoint_tag("phase1", step), {"step": step}, keep=2)
    assert [m["tag"] for m in complete_checkpoints(tmp_path)] == [
        "search-step000010", "phase1-step000002", "phase1-step000003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest", "phase1-step000002", "phase1-step000003", "search-step000010"]
    assert (tmp_path / "latest").read_text() == "phase1-step000003"
    assert load_latest_checkpoint(engine, tmp_path, stage="search") == {"step": 10}
    with pytest.raises(ValueError, match="keep_checkpoints"):
        save_checkpoint(engine, tmp_path, checkpoint_tag("phase1", 4), {}, keep=0)


@pytest.mark.parametrize("damage", ["truncate", "overwrite", "delete"])
def test_corrupt_latest_falls_back_to_the_previous_tag(single_process_dist, tmp_path, caplog, damage):
    data = batches(2, 8)
    engine, _ = make_engine(tiny_model())
    train_steps(engine, data[:1])
    save_checkpoint(engine, tmp_path, checkpoint_tag("phase2", 1), {"step": 1}, keep=3)
    first_params = parameters(engine)
    train_steps(engine, data[1:])
    save_checkpoint(engine, tmp_path, checkpoint_tag("phase2", 2), {"step": 2}, keep=3)
    (tmp_path / checkpoint_tag("phase2", 3)).mkdir()  # a save that crashed before its marker: never a candidate
    (tmp_path / checkpoint_tag("phase2", 3) / "mp_rank_00_model_states.pt").write_bytes(b"partial")

    states = tmp_path / checkpoint_tag("phase2", 2) / "mp_rank_00_model_states.pt"
    size = states.stat().st_size
    if damage == "truncate":
        with open(states, "r+b") as handle:
            handle.truncate(size // 2)
    elif damage == "overwrite":  # same size, garbage content: the sha256 in the marker tells
        states.write_bytes(bytes(size))
    else:
        states.unlink()

    resumed, _ = make_engine(tiny_model(seed=5))
    with caplog.at_level(logging.WARNING, logger="earlybert_pretrain.train.engine"):
        client_state = load_latest_checkpoint(resumed, tmp_path)
    assert client_state == {"step": 1}
    assert "phase2-step000002" in caplog.text and "falling back" in caplog.text and "phase2-step000001" in caplog.text
    for name, value in parameters(resumed).items():
        assert torch.equal(value, first_params[name]), name
    assert resumed.global_steps == 1


def test_no_usable_checkpoint(single_process_dist, tmp_path):
    engine, _ = make_engine(tiny_model())
    assert load_latest_checkpoint(engine, tmp_path / "missing") is None
    marker_less = tmp_path / checkpoint_tag("search", 5)
    marker_less.mkdir()
    assert load_latest_checkpoint(engine, tmp_path) is None
    save_checkpoint(engine, tmp_path, checkpoint_tag("search", 6), {"step": 6}, keep=1)
    states = tmp_path / checkpoint_tag("search", 6) / "mp_rank_00_model_states.pt"
    states.write_bytes(bytes(states.stat().st_size))  # the only checkpoint, damaged before its marker was written:
    marker_path = states.parent / COMPLETE_MARKER  # its checksum matches, only the load itself can tell
    marker = json.loads(marker_path.read_text())
    marker["sha256"][states.name] = sha256_file(states)
    marker_path.write_text(json.dumps(marker))
    with pytest.raises(RuntimeError, match="search-step000006 failed while loading"):
        load_latest_checkpoint(engine, tmp_path)


def test_describe_runtime_sees_a_compiled_encoder(single_process_dist):
    model = tiny_model()
    model.bert.encoder.compile()  # lazy: nothing is compiled until the first forward
    engine, kernel = make_engine(model, precision="bf16")
    runtime = describe_runtime(engine, kernel)
    assert runtime["torch_compile"] and runtime["precision"] == "bf16" and not runtime["dynamic_loss_scaling"]
