"""benchmarks/gpu_check.py: one line and exit 2 without CUDA; its arithmetic, peak table, kernel reading and tables
with exact numbers; the whole run on the CPU with a tiny model (--smoke-cpu) to check the plumbing."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from earlybert_pretrain.model.bert import BertConfig, flops_per_token

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # its dataclasses look their module up there
_spec.loader.exec_module(gpu_check)


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}  # no GPU even on a GPU machine
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


def test_without_cuda_one_line_and_exit_2():
    result = run_script()
    assert result.returncode == 2
    assert (result.stdout + result.stderr).strip() == gpu_check.NEEDS_CUDA
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name, precision, tf32, peak", [
    ("Tesla V100-SXM2-16GB", "fp16", False, 125.0),
    ("Tesla V100-SXM2-32GB", "fp32", True, 15.7),  # no TF32 on Volta: the fp32 rate
    ("Tesla V100-PCIE-16GB", "fp32", False, 14.0),
    ("Tesla V100-SXM2-16GB", "bf16", False, None),
    ("NVIDIA A100-SXM4-80GB", "bf16", False, 312.0),
    ("NVIDIA A100-PCIE-40GB", "fp32", False, 19.5),
    ("NVIDIA A100-SXM4-40GB", "fp32", True, 156.0),
    ("NVIDIA H100 80GB HBM3", "bf16", False, 989.4),
    ("NVIDIA H100 PCIe", "fp16", False, 756.0),
    ("NVIDIA H100 NVL", "bf16", False, 835.0),
    ("NVIDIA H200", "fp32", False, 66.9),
    ("NVIDIA H200", "bf16", False, 989.4),
    ("NVIDIA GeForce RTX 4090", "bf16", False, None),
    ("A100-SXM4-40GB", "bf16", False, 312.0),  # older drivers leave the vendor prefix out
    ("NVIDIA A100 80GB PCIe", "fp16", False, 312.0),
    ("Tesla V100S-PCIE-32GB", "fp16", False, 130.0),
    ("NVIDIA H200 NVL", "bf16", False, 835.0),
    # names that contain a known one are other GPUs: no peak, no MFU
    ("NVIDIA RTX A1000", "bf16", False, None),
    ("NVIDIA RTX A1000 Laptop GPU", "fp32", False, None),
    ("NVIDIA A100X", "bf16", False, None),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "bf16", False, None),
])
def test_peak_table_lookup(name, precision, tf32, peak):
    assert gpu_check.peak_tflops(name, precision, tf32) == peak


def test_an_unknown_gpu_gets_a_row_without_mfu():
    """The run table names the GPU unknown and computes no MFU, where a substring match took an A100's peak."""
    results = [result(128, "bf16", "dense", 0.100, 1e9)]
    row = gpu_check.run_table(results, "NVIDIA RTX A1000").splitlines()[2].split(" | ")
    headers = gpu_check.run_table([], "").splitlines()[0].split(" | ")
    assert row[headers.index("peak")] == gpu_check.UNKNOWN_GPU and row[headers.index("MFU")] == "n/a"
    known = gpu_check.run_table(results, "NVIDIA A100-SXM4-80GB").splitlines()[2].split(" | ")
    assert known[headers.index("peak")] == "312.0" and known[headers.index("MFU")] == "26.3%"  # 8.192e-2 / 312


def test_mfu_arithmetic():
    assert gpu_check.achieved_tflops(100.0, 128, 1e9) == 12.8
    assert gpu_check.mfu(100.0, 128, 1e9, 128.0) == 0.1
    assert gpu_check.mfu(100.0, 128, 1e9, None) is None
    # BERT-base at seq 128 (sparse MLM head): 1000 seq/s on a V100 in fp16 is 128,000 tokens/s.
    per_token = flops_per_token(BertConfig(), 128)
    assert gpu_check.mfu(1000.0, 128, per_token, 125.0) == 1000.0 * 128 * per_token / 1e12 / 125.0


def test_classify_kernels():
    apex_run = ["aten::native_layer_norm", "aten::_scaled_dot_product_efficient_attention", "aten::_foreach_mul_",
                "void multi_tensor_apply_kernel<TensorListMetadata<4>, LAMBStage1Functor<float>>"]
    assert gpu_check.classify_kernels(apex_run) == {
        "lamb": "apex FusedLAMB", "layer_norm": "torch native", "sdpa": "mem-efficient"}
    fused = ["void cuApplyLayerNorm<float>", "lamb_cuda_kernel_part1", "aten::_scaled_dot_product_flash_attention",
             "aten::_scaled_dot_product_attention_math"]
    assert gpu_check.classify_kernels(fused) == {
        "lamb": "DeepSpeed FusedLamb", "layer_norm": "apex fused", "sdpa": "flash + math"}
    cpu = ["aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_foreach_add_"]
    assert gpu_check.classify_kernels(cpu) == {
        "lamb": "torch foreach (unfused)", "layer_norm": "none seen", "sdpa": "flash (cpu)"}
    assert gpu_check.classify_kernels(["aten::mm"]) == {
        "lamb": "none seen", "layer_norm": "none seen", "sdpa": "none seen"}


def test_without_cupti_fused_kernels_read_unknown_not_torch():
    """A CUDA profile without kernels (no CUPTI) of an apex run shows only the host ops: DeepSpeed's foreach
    bookkeeping and no LayerNorm op. Those would read as torch foreach and "none seen"; they are unknown instead.
    The SDPA choice is a host-side aten op and still reads."""
    host_ops_of_an_apex_run = ["aten::_foreach_mul_", "aten::_scaled_dot_product_flash_attention", "aten::mm"]
    assert gpu_check.classify_kernels(host_ops_of_an_apex_run, cuda_kernels_recorded=False) == {
        "lamb": gpu_check.NO_CUPTI, "layer_norm": gpu_check.NO_CUPTI, "sdpa": "flash"}


def test_format_table():
    assert gpu_check.format_table(["a", "b"], [[1, "x"], [2.5, None]]) == (
        "| a | b |\n|---|---|\n| 1 | x |\n| 2.5 | None |")
    assert gpu_check.fmt(None, ".1f") == "n/a" and gpu_check.fmt(0.0415, ".1%") == "4.2%"


def result(seq_len, precision, model, step_seconds, flops, losses=(), extra=False):
    spec = gpu_check.RunSpec(seq_len, precision, model, 64, extra=extra)
    return gpu_check.RunResult(spec, flops, 64, step_seconds, list(losses))


def test_ratio_and_loss_tables():
    results = [result(128, "fp32", "dense", 0.100, 100.0, [11.0, 9.0]),
               result(128, "fp32", "ticket", 0.080, 70.0, [11.0, 9.5]),
               result(128, "bf16", "dense", 0.050, 100.0, [11.0, 9.02]),
               result(128, "fp32", "dense", 0.090, 100.0, [11.0, 9.0], extra=True)]
    assert gpu_check.ratio_table(results).splitlines()[2] == "| 128 | fp32 | 0.800 | 0.700 | 1.143 |"
    results[1].batch = 32  # an out-of-memory retry at half the batch: the ratio is per sequence
    assert gpu_check.ratio_table(results).splitlines()[2] == "| 128 | fp32 | 1.600 | 0.700 | 2.286 |"
    results[1].batch = 64
    rows = gpu_check.loss_table(results, steps=2).splitlines()[2:]
    assert rows == ["| 128 | fp32 | 11.0000 | 9.0000 | +0.0000 | +0.00% |",
                    "| 128 | bf16 | 11.0000 | 9.0200 | +0.0200 | +0.22% |"]
    # 64 sequences in 0.1 s = 640 seq/s; at 100 FLOPs per token and seq 128: 8.192e-6 TFLOP/s
    assert results[0].sequences_per_second == 640.0


def test_smoke_run_on_the_cpu(single_process_dist, capsys):
    """The whole script (Stage.build, timing, profiling, tables) with a tiny model: fp32 dense and ticket."""
    assert gpu_check.main(["--smoke-cpu", "--steps", "3", "--warmup", "1", "--seqs", "32", "--tokens-per-step", "64",
                           "--precisions", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "| 32 | fp32 | dense | auto | 2 |" in out and "| 32 | fp32 | ticket | auto | 2 |" in out
    assert "torch-foreach | torch foreach (unfused) | torch native |" in out
    ratios, losses = out.split("| pruned/dense step time |")[1].split("loss step 3")
    assert "| 32 | fp32 | " in ratios and "| 32 | fp32 | " in losses


def test_a_failing_run_becomes_a_note(capsys):
    """optimizer.fused=apex on the CPU is a ConfigError: the check reports it in the table and goes on."""
    import torch

    from earlybert_pretrain.train.stage import Runtime

    models = gpu_check.build_models(gpu_check.model_config(smoke=True))
    spec = gpu_check.RunSpec(32, "fp32", "dense", 2, lamb_kernel="apex")
    result = gpu_check.train_or_note(models, spec, Runtime(0, 1, torch.device("cpu"), "fp32"), steps=2, warmup=1)
    assert result.note.startswith("failed: ConfigError: optimizer.fused=apex") and result.step_seconds is None
    assert "Traceback" in capsys.readouterr().err


# --- benchmarks/gpu_wheels.py: what the GPU kit installs ---------------------------------------------------------

_wheels_spec = importlib.util.spec_from_file_location("gpu_wheels", ROOT / "benchmarks" / "gpu_wheels.py")
gpu_wheels = importlib.util.module_from_spec(_wheels_spec)
_wheels_spec.loader.exec_module(gpu_wheels)


def test_every_kit_wheel_is_pinned_to_a_tested_version():
    versions = gpu_wheels.pins()
    assert [name for name in gpu_wheels.KIT if name not in versions] == []
    assert gpu_wheels.wheel_distribution(Path("pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.whl")) == (
        "pydantic-core")


def test_install_adds_only_what_the_machine_lacks(tmp_path, monkeypatch, capsys):
    """A wheel of an installed distribution (pytest here, any version) is kept out: the machine's own torch / numpy
    stay; only the missing one goes to pip, offline and without dependencies."""
    for name in ("pytest-1.0-py3-none-any.whl", "not_installed_here-1.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    calls = []
    monkeypatch.setattr(gpu_wheels.subprocess, "run", lambda args, **kwargs: calls.append(args))
    assert gpu_wheels.install(tmp_path, tmp_path / "site") == 0
    (args,) = calls
    assert args[args.index("install") + 1:] == ["--no-index", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                                                str(tmp_path / "not_installed_here-1.0-py3-none-any.whl")]
    assert "already installed, kept: pytest" in capsys.readouterr().out


def test_install_refuses_a_machine_without_torch_and_transformers_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_wheels, "installed", lambda name: name not in ("numpy", "transformers"))
    assert gpu_wheels.install(tmp_path, tmp_path / "site") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lacks numpy, transformers" in err


@pytest.mark.parametrize("args, env, message", [
    ([], {}, "gpu_kit: no OUT_DIR given; usage: bash benchmarks/gpu_kit.sh OUT_DIR [--smoke-cpu]"),
    (["out", "--fast"], {}, "gpu_kit: unknown option --fast; usage: bash benchmarks/gpu_kit.sh OUT_DIR [--smoke-cpu]"),
    (["out"], {"EARLYBERT_WHEELS": "no-such-folder"}, "gpu_kit: no wheel folder no-such-folder: run 'python "
     "benchmarks/gpu_wheels.py prepare' where there is network and bring the folder along (git ignores it)"),
])
def test_gpu_kit_refuses_bad_calls_in_one_line_and_writes_nothing(tmp_path, args, env, message):
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_kit.sh"), *args], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, **env}, timeout=60)
    assert (result.returncode, result.stderr.strip(), result.stdout) == (2, message, "")
    assert list(tmp_path.iterdir()) == []
