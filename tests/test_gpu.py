"""On a CUDA GPU (marker ``gpu``; skipped without one): the kernels the GPU runs against CPU / float64 references,
fp16 overflow handling, ZeRO LAMB and the tiny recipe unpadded, end to end.

benchmarks/gpu_kit.sh runs them (``pytest -m gpu``) with DS_ACCELERATOR=cuda: tests/conftest.py otherwise puts
DeepSpeed on its CPU accelerator, and these tests then skip and say so. Its ``--smoke-cpu`` rehearsal sets
EARLYBERT_GPU_TESTS_ON_CPU=1 and runs the same code on the CPU (the CUDA-only assertions are left out there).
"""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
import yaml
from test_optim import BETAS, EPS, random_problem, reference_lamb
from test_precision import STEPS, open_batches, settings, tiny_model
from test_pretrain import tiny_recipe

from earlybert_pretrain.config import OptimizerConfig
from earlybert_pretrain.model.bert import make_layer_norm
from earlybert_pretrain.model.unpad import Packing, varlen_attention, varlen_backend
from earlybert_pretrain.pretrain import cli as pretrain
from earlybert_pretrain.train.optim import build_optimizer
from earlybert_pretrain.train.stage import Runtime, Schedule, Stage, StageSettings

pytestmark = pytest.mark.gpu
pytest_plugins = ["data_fixtures"]
ON_CPU = "EARLYBERT_GPU_TESTS_ON_CPU"


@pytest.fixture(scope="module")
def device(single_process_dist) -> torch.device:
    if torch.cuda.is_available():
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cuda":
            pytest.skip("DeepSpeed is on its CPU accelerator (tests/conftest.py's default): run the gpu tests with "
                        "DS_ACCELERATOR=cuda, as benchmarks/gpu_kit.sh does")
        return torch.device("cuda", 0)
    if os.environ.get(ON_CPU) == "1":
        return torch.device("cpu")
    pytest.skip("needs a CUDA GPU")


def on_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


def test_layer_norm_kernel_matches_the_definition_in_float64(device):
    """The LayerNorm the model builds on this device (apex FusedLayerNorm where installed, else torch's) against
    (x - mean) / sqrt(var + eps) * w + b computed in float64 on the CPU: output and all three gradients."""
    torch.manual_seed(0)
    eps = 1e-12
    norm = make_layer_norm(768, eps, fused=True).to(device)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
        norm.bias.normal_(0.0, 0.1)
    x, grad_out = torch.randn(32, 128, 768) * 3 + 1, torch.randn(32, 128, 768)
    params = [norm.weight.detach().cpu().double().requires_grad_(), norm.bias.detach().cpu().double().requires_grad_()]
    x64 = x.double().requires_grad_()
    mean = x64.mean(-1, keepdim=True)
    expected = (x64 - mean) / torch.sqrt((x64 - mean).square().mean(-1, keepdim=True) + eps) * params[0] + params[1]
    expected.backward(grad_out.double())
    xd = x.to(device).requires_grad_()
    got = norm(xd)
    got.backward(grad_out.to(device))
    for value, reference in ((got, expected), (xd.grad, x64.grad), (norm.weight.grad, params[0].grad),
                             (norm.bias.grad, params[1].grad)):
        torch.testing.assert_close(value.detach().cpu().double(), reference.detach(), rtol=1e-4, atol=1e-4)


class Tensors(torch.nn.Module):
    """The problem's tensors as parameters, decayed ones named ``weight`` and the others ``bias`` (the rule of
    ``weight_decay_groups``), in the problem's order."""

    def __init__(self, weights: list[torch.Tensor], decays: list[float]):
        super().__init__()
        self.holders = torch.nn.ModuleList()
        for weight, decay in zip(weights, decays):
            holder = torch.nn.Module()
            holder.register_parameter("weight" if decay else "bias", torch.nn.Parameter(weight.clone()))
            self.holders.append(holder)


def test_lamb_kernel_matches_the_float64_reference(device):
    """The LAMB ``optimizer.fused=auto`` picks on this device (apex FusedLAMB where installed, else ours) over six
    steps against You et al.'s LAMB written out in float64 (tests/test_optim.py's reference)."""
    weights, grads = random_problem()
    decays = [0.01, 0.0, 0.0, 0.01]
    model = Tensors(weights, decays).to(device)
    optimizer, kernel = build_optimizer(model, OptimizerConfig(betas=list(BETAS), eps=EPS, weight_decay=0.01), 0.05)
    for step_grads in grads:
        for param, grad in zip(model.parameters(), step_grads):
            param.grad = grad.to(device)
        optimizer.step()
    print(f"LAMB kernel on {device}: {kernel}")
    expected = reference_lamb(weights, grads, decays, lr=0.05, use_nvlamb=False)
    for param, reference in zip(model.parameters(), expected):
        torch.testing.assert_close(param.detach().cpu().double(), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_jagged_attention_in_bf16_is_as_close_to_fp32_as_padded_bf16(device):
    """Variable-length attention over jagged nested tensors in bf16 against masked (padded) SDPA in fp32, beside
    padded SDPA in bf16: the jagged kernel's error, outputs and input gradients, stays within bf16's and within
    twice the padded kernel's. On CUDA it must be a fused variable-length kernel, not the math fallback."""
    batch, seq, heads, size = 4, 128, 12, 64
    lengths = [128, 97, 33, 1]
    mask = (torch.arange(seq)[None] < torch.tensor(lengths)[:, None]).to(device)
    packing = Packing.from_mask(mask, lengths)
    torch.manual_seed(0)
    padded = [torch.randn(batch, seq, heads, size, device=device) for _ in range(3)]
    grad_out = packing.gather(torch.randn(batch, seq, heads, size, device=device))

    def masked(dtype: torch.dtype) -> list[torch.Tensor]:
        inputs = [x.to(dtype).requires_grad_() for x in padded]
        out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in inputs), attn_mask=mask[:, None, None])
        out = packing.gather(out.transpose(1, 2))
        grads = torch.autograd.grad(out, inputs, grad_out.to(dtype))
        return [out.float(), *(packing.gather(g).float() for g in grads)]

    packed = [packing.gather(x).bfloat16().requires_grad_() for x in padded]
    out = varlen_attention(*packed, packing, dropout_p=0.0, nested=True)
    jagged = [out.float(), *(g.float() for g in torch.autograd.grad(out, packed, grad_out.bfloat16()))]
    reference, padded_bf16 = masked(torch.float32), masked(torch.bfloat16)
    for name, got, bf16, ref in zip(("output", "dq", "dk", "dv"), jagged, padded_bf16, reference):
        error, padded_error = (got - ref).abs().max().item(), (bf16 - ref).abs().max().item()
        assert error < 5e-2 and error <= 2 * padded_error + 1e-3, (name, error, padded_error)
    if device.type == "cuda":
        backend = varlen_backend(*packed, packing, dropout_p=0.0, nested=True)
        assert backend in ("nested:flash", "nested:mem-efficient", "nested:cudnn"), backend


def test_fp16_overflow_skips_the_update_and_holds_the_lr_schedule(device):
    """tests/test_precision.py's overflow rule where fp16 is meant to run: a step whose scaled gradients overflow
    leaves the weights and the schedule as they were and halves the scale; the next step runs at the held lr."""
    stream = open_batches(0)

    def run_one_step(stage: Stage, scale: float) -> float:
        scaler = stage.engine.torch_autocast_z0_gradscaler
        scaler.load_state_dict({**scaler.state_dict(), "scale": scale})
        lr = stage.engine.get_lr()[0]
        stage.train_step([on_device(next(stream), device) for _ in range(4)])
        return lr

    poly = StageSettings(**{**vars(settings("fp16")), "schedule": Schedule(total_steps=STEPS, warmup=0.5)})
    with Stage.build(tiny_model(), poly, Runtime(0, 1, device, "fp16")) as stage:
        before = {name: p.detach().clone() for name, p in stage.module.named_parameters()}
        first_lr = run_one_step(stage, 2.0 ** 40)
        assert stage.engine.optimizer.overflow and stage.engine.skipped_steps == 1
        assert stage.engine.torch_autocast_z0_gradscaler.get_scale() == 2.0 ** 39
        assert all(torch.equal(before[name], p) for name, p in stage.module.named_parameters())
        assert stage.engine.get_lr()[0] == first_lr > 0
        run_one_step(stage, 1024.0)
        assert not stage.engine.optimizer.overflow and stage.engine.skipped_steps == 1
        assert not all(torch.equal(before[name], p) for name, p in stage.module.named_parameters())
        assert stage.engine.get_lr()[0] > first_lr


def test_zero_2_lamb_on_one_gpu_equals_zero_0(device):
    """ZeRO 2 on one rank hands LAMB one flat partition per group; train/zero_lamb.py keeps the trust ratio per
    tensor, so six steps (accumulation 4) equal ZeRO 0's. One trust ratio for the whole partition would not."""
    def trained(zero_stage: int) -> dict[str, torch.Tensor]:
        stage_settings = StageSettings(**{**vars(settings(f"zero{zero_stage}")), "zero_stage": zero_stage})
        with Stage.build(tiny_model(), stage_settings, Runtime(0, 1, device, "fp32")) as stage:
            stage.run(open_batches, STEPS)
            return {name: p.detach().cpu().clone() for name, p in stage.module.named_parameters()}

    zero0, zero2 = trained(0), trained(2)
    initial = dict(tiny_model().named_parameters())
    errors = {name: float((zero2[name] - zero0[name]).norm() / (zero0[name] - initial[name]).norm().clamp_min(1e-12))
              for name in zero0}
    assert max(errors.values()) < 1e-4, max(errors.items(), key=lambda item: item[1])


def test_the_tiny_recipe_runs_unpadded_end_to_end(device, wiki_build, tmp_path):
    """tests/test_pretrain.py's tiny recipe (search, draw, phase 1 at seq 32, phase 2 at seq 64, accumulation 2)
    with model.unpad=true, in bf16 where the GPU has it: finite losses that fall, the final model saved, and no
    attention ran on a padded batch (pre-training batches are mostly full: those run unmasked, the rest unpadded)."""
    config = tiny_recipe(wiki_build.shards)
    config["model"]["unpad"] = True
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    config["engine"]["precision"] = "bf16" if bf16 else "fp32"
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    assert pretrain.main(["--config", str(path), f"output_dir={out}"]) == 0
    assert (out / "final_model" / "model.safetensors").is_file()
    progress = json.loads((out / "progress.json").read_text())
    losses = progress["search"]["losses"] + progress["phase1"]["losses"] + progress["phase2"]["losses"]
    assert all(math.isfinite(loss) for loss in losses)
    assert progress["phase2"]["losses"][-1] < progress["search"]["losses"][0] - 0.2
    timing = json.loads((out / "timing.json").read_text())
    for stage in ("search", "phase1", "phase2"):
        backends = timing[stage]["runtime"]["sdpa_backends"]
        print(f"{stage} attention on {device}: {backends}")
        assert backends and all(backend.startswith(("unmasked:", "unpadded:")) for backend in backends), backends
    assert timing["phase1"]["runtime"]["precision"] == config["engine"]["precision"]
