"""LAMB against references written from the equations, the kernel choice, and the LR schedules at known steps."""

import math
import sys
import types

import apex_fused_lamb
import pytest
import torch

from earlybert_pretrain.config import ConfigError, OptimizerConfig
from earlybert_pretrain.model.bert import BertConfig, BertForPreTraining
from earlybert_pretrain.train import optim
from earlybert_pretrain.train.optim import Lamb, build_optimizer, weight_decay_groups
from earlybert_pretrain.train.schedules import build_scheduler, linear_warmup_decay, warmup_poly_lr

BETAS, EPS = (0.9, 0.999), 1e-6


def reference_lamb_step(weights, grads, moments, step, decays, lr, use_nvlamb):
    """One step of You et al. 2020 (Alg. 2) with Adam bias correction and decoupled decay, one tensor at a time, in
    float64; ``moments`` is a list of (m, v) pairs (zeros before step 1), replaced in place; returns the weights."""
    b1, b2 = BETAS
    updated = []
    for i, (w, g, decay) in enumerate(zip(weights, grads, decays)):
        w, g = w.double(), g.double()
        m, v = moments[i]
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        moments[i] = (m, v)
        m_hat, v_hat = m / (1 - b1**step), v / (1 - b2**step)
        update = m_hat / (v_hat.sqrt() + EPS) + decay * w
        ratio = 1.0
        if use_nvlamb or decay != 0:
            w_norm, u_norm = w.norm().item(), update.norm().item()
            if w_norm > 0 and u_norm > 0:
                ratio = w_norm / u_norm
        updated.append(w - lr * ratio * update)
    return updated


def reference_lamb(weights, grads_per_step, decays, lr, use_nvlamb):
    weights = [w.double().clone() for w in weights]
    moments = [(torch.zeros_like(w), torch.zeros_like(w)) for w in weights]
    for t, grads in enumerate(grads_per_step, start=1):
        weights = reference_lamb_step(weights, grads, moments, t, decays, lr, use_nvlamb)
    return weights


def random_problem(seed=0, steps=6):
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(5, 7, generator=generator), torch.zeros(7), torch.randn(3, generator=generator) * 0.1,
               torch.randn(4, 4, generator=generator)]
    grads = [[torch.randn(w.shape, generator=generator) * (1 + step) for w in weights] for step in range(steps)]
    return weights, grads


def two_groups(params, decays):
    return [{"params": [p for p, d in zip(params, decays) if d], "weight_decay": 0.01},
            {"params": [p for p, d in zip(params, decays) if not d], "weight_decay": 0.0}]


def run_optimizer(optimizer_class, weights, grads_per_step, decays, lr, **kwargs):
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    optimizer = optimizer_class(two_groups(params, decays), lr=lr, betas=BETAS, eps=EPS, **kwargs)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
    return params


@pytest.mark.parametrize("use_nvlamb", [False, True])
def test_lamb_matches_reference_over_several_steps(use_nvlamb):
    weights, grads = random_problem()
    decays = [0.01, 0.0, 0.0, 0.01]  # a zero-initialised bias exercises the "ratio 1 when ||w|| = 0" branch
    expected = reference_lamb(weights, grads, decays, lr=0.05, use_nvlamb=use_nvlamb)
    got = run_optimizer(Lamb, weights, grads, decays, lr=0.05, use_nvlamb=use_nvlamb, weight_decay=0.01)
    for p, e in zip(got, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-6, atol=1e-7)
    # the trust ratio really acts: plain AdamW-style steps would land elsewhere
    adam_like = reference_lamb(weights, grads, decays, lr=0.05, use_nvlamb=False)
    if use_nvlamb:
        assert not torch.allclose(adam_like[2], expected[2])


def test_lamb_state_dict_round_trip_continues_identically():
    weights, grads = random_problem(steps=6)
    decays = [0.01, 0.0, 0.0, 0.01]
    straight = run_optimizer(Lamb, weights, grads, decays, lr=0.05, weight_decay=0.01)

    params = [torch.nn.Parameter(w.clone()) for w in weights]
    first, second = (Lamb(two_groups(params, decays), lr=0.05, betas=BETAS, eps=EPS) for _ in range(2))
    for step_grads in grads[:3]:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        first.step()
    second.load_state_dict(first.state_dict())
    for step_grads in grads[3:]:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        second.step()
    for p, s in zip(params, straight):
        assert torch.equal(p, s)


@pytest.fixture
def fake_apex(monkeypatch):
    apex, apex_optimizers = types.ModuleType("apex"), types.ModuleType("apex.optimizers")
    apex_optimizers.FusedLAMB = apex_fused_lamb.FusedLAMB
    apex.optimizers = apex_optimizers
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.optimizers", apex_optimizers)
    monkeypatch.setitem(sys.modules, "amp_C", types.ModuleType("amp_C"))
    monkeypatch.setattr(optim, "_on_cuda", lambda model: True)


def tiny_model(slimming=False, seed=0):
    torch.manual_seed(seed)
    return BertForPreTraining(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=24, max_position_embeddings=16, slimming=slimming))


def train_with(optimizer, model, steps=4):
    """A few steps with dropout on (BertConfig's default 0.1): the same seed gives two models the same masks."""
    torch.manual_seed(2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(1, 50, (4, 10), generator=generator)
        labels = torch.where(torch.rand(4, 10, generator=generator) < 0.3, ids, -100)
        labels[:, 0] = ids[:, 0]
        optimizer.zero_grad()
        model(ids, labels=labels, next_sentence_label=torch.tensor([0, 1, 0, 1])).loss.backward()
        optimizer.step()


def test_auto_picks_apex_on_cuda_configured_to_compute_our_lamb(fake_apex):
    """apex's FusedLAMB (transcribed from its kernel, tests/apex_fused_lamb.py) as we configure it computes our LAMB."""
    model, twin = tiny_model(), tiny_model()
    apex_optimizer, kernel = build_optimizer(model, OptimizerConfig(fused="auto"), lr=0.02)
    assert kernel == "apex-fused-lamb" and isinstance(apex_optimizer, apex_fused_lamb.FusedLAMB)
    assert apex_optimizer.defaults["max_grad_norm"] == math.inf  # the engine clips; the kernel must not clip again
    ours, ours_kernel = build_optimizer(twin, OptimizerConfig(fused="torch"), lr=0.02)
    assert ours_kernel == "torch-foreach" and isinstance(ours, Lamb)
    train_with(apex_optimizer, model)
    train_with(ours, twin)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("flag", [{"adam_w_mode": False}, {"grad_averaging": False}, {"bias_correction": False},
                                  {"use_nvlamb": True}, {"max_grad_norm": 1.0}])
def test_each_apex_flag_we_set_changes_the_result(flag):
    """The comparison above is sensitive: apex with any one of _apex_lamb's settings flipped is not our LAMB."""
    settings = dict(bias_correction=True, grad_averaging=True, adam_w_mode=True, max_grad_norm=math.inf,
                    use_nvlamb=False)
    model, twin = tiny_model(), tiny_model()
    cfg = OptimizerConfig()
    flipped = apex_fused_lamb.FusedLAMB(weight_decay_groups(model, cfg.weight_decay), lr=0.02, betas=tuple(cfg.betas),
                                        eps=cfg.eps, weight_decay=cfg.weight_decay, **{**settings, **flag})
    train_with(flipped, model)
    train_with(build_optimizer(twin, cfg, lr=0.02)[0], twin)
    deviation = max((a - b).abs().max().item() for a, b in zip(model.parameters(), twin.parameters()))
    assert deviation > 1e-4, flag


def test_auto_on_cpu_is_ours_and_forcing_an_absent_kernel_is_a_clear_error():
    model = tiny_model()
    optimizer, kernel = build_optimizer(model, OptimizerConfig(), lr=0.01)
    assert kernel == "torch-foreach" and isinstance(optimizer, Lamb)
    for fused in ("apex", "deepspeed"):
        with pytest.raises(ConfigError, match=f"optimizer.fused={fused}.*CUDA"):
            build_optimizer(model, OptimizerConfig(fused=fused), lr=0.01)
    with pytest.raises(ConfigError, match="optimizer.fused"):
        build_optimizer(model, OptimizerConfig(fused="fast"), lr=0.01)
    with pytest.raises(ConfigError, match="optimizer.name"):
        build_optimizer(model, OptimizerConfig(name="sgd"), lr=0.01)


def test_forced_apex_missing_and_deepspeed_op_unbuildable_are_clear_errors(monkeypatch):
    monkeypatch.setattr(optim, "_on_cuda", lambda model: True)
    monkeypatch.setitem(sys.modules, "apex", None)  # import apex raises ImportError
    model = tiny_model()
    with pytest.raises(ConfigError, match="Apex"):
        build_optimizer(model, OptimizerConfig(fused="apex"), lr=0.01)
    # auto without apex on CUDA: ours, never DeepSpeed's FusedLamb (a different LAMB variant)
    assert build_optimizer(model, OptimizerConfig(fused="auto"), lr=0.01)[1] == "torch-foreach"
    with pytest.raises(ConfigError, match="fused_lamb op"):  # no CUDA toolchain here: the op cannot load
        build_optimizer(model, OptimizerConfig(fused="deepspeed"), lr=0.01)


def test_adamw_for_fine_tuning():
    optimizer, kernel = build_optimizer(tiny_model(), OptimizerConfig(name="adamw", weight_decay=0.01), lr=2e-5)
    assert kernel == "torch-adamw" and isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]


def test_weight_decay_groups_leave_out_biases_layer_norms_and_coefficients():
    model = tiny_model(slimming=True)
    groups = weight_decay_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    undecayed = {names[id(p)] for p in groups[1]["params"]}
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    expected_undecayed = {n for n in names.values()
                          if n.endswith("bias") or "LayerNorm" in n or n.endswith("_coefficients")}
    assert undecayed == expected_undecayed
    assert decayed == set(names.values()) - expected_undecayed
    assert "bert.embeddings.word_embeddings.weight" in decayed  # tied with the MLM decoder, listed once
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    assert sum(1 for n in undecayed if n.endswith("_coefficients")) == 4  # 2 layers x (heads, ffn)


def test_warmup_poly_lr_known_values():
    base, total, warmup = 6e-3, 100, 0.2
    assert warmup_poly_lr(0, base, total, warmup) == 0.0
    assert warmup_poly_lr(10, base, total, warmup) == pytest.approx(base * 0.5)
    assert warmup_poly_lr(19, base, total, warmup) == pytest.approx(base * 0.95)
    assert warmup_poly_lr(20, base, total, warmup) == pytest.approx(base * 0.8**0.5)  # NVIDIA's jump, kept
    assert warmup_poly_lr(60, base, total, warmup) == pytest.approx(base * 0.4**0.5)
    assert warmup_poly_lr(100, base, total, warmup) == 0.0
    assert warmup_poly_lr(50, base, total, warmup, power=1.0) == pytest.approx(base * 0.5)
    # NVIDIA phase 1: warmup 0.2843 of 7,038 steps ends between steps 2000 and 2001
    assert warmup_poly_lr(2000, 6e-3, 7038, 0.2843) == pytest.approx(6e-3 * 2000 / (0.2843 * 7038))
    assert warmup_poly_lr(2001, 6e-3, 7038, 0.2843) == pytest.approx(6e-3 * (1 - 2001 / 7038) ** 0.5)
    with pytest.raises(ValueError, match="warmup"):
        warmup_poly_lr(1, base, total, 1.0)
    with pytest.raises(ValueError, match="total_steps"):
        warmup_poly_lr(1, base, 0, 0.1)


def test_linear_warmup_decay_known_values():
    assert linear_warmup_decay(0, 1.0, 100, 0.1) == 0.0
    assert linear_warmup_decay(5, 1.0, 100, 0.1) == pytest.approx(0.5)
    assert linear_warmup_decay(10, 1.0, 100, 0.1) == pytest.approx(1.0)
    assert linear_warmup_decay(55, 1.0, 100, 0.1) == pytest.approx(0.5)
    assert linear_warmup_decay(100, 1.0, 100, 0.1) == 0.0
    assert linear_warmup_decay(0, 1.0, 100, 0.0) == pytest.approx(1.0)


@pytest.mark.parametrize("schedule", ["warmup_poly", "warmup_linear"])
def test_scheduler_uses_nvidia_step_numbering(schedule):
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = Lamb([param], lr=4e-3)
    scheduler = build_scheduler(optimizer, total_steps=10, warmup_fraction=0.3, power=0.5, schedule=schedule)
    used = []
    for _ in range(10):
        param.grad = torch.ones(2)
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    if schedule == "warmup_poly":
        expected = [warmup_poly_lr(n, 4e-3, 10, 0.3) for n in range(1, 11)]
    else:
        expected = [linear_warmup_decay(n, 4e-3, 10, 0.3) for n in range(1, 11)]
    assert used == pytest.approx(expected)
    assert used[0] > 0 and used[-1] == 0.0
