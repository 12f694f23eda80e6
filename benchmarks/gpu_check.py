"""One command for a CUDA machine: BERT-base trained a few steps in fp32, bf16 and fp16, in under 8 minutes.

    python benchmarks/gpu_check.py [--steps 20] [--warmup 5] [--tokens-per-step 8192] [--seqs 128 512]
                                   [--lamb-kernel auto] [--budget-s 450]

For each sequence length, precision (bf16 is skipped with a note on a GPU without it, e.g. V100) and model -- dense
BERT-base and a 4-heads-per-layer / 30%-FFN global random ticket, physically pruned (tickets.draw.random_ticket,
tickets.prune.prune) -- it builds the project's training backend (``Stage.build``: LAMB with the kernel that
``optimizer.fused`` picks, the DeepSpeed engine, the precision) and runs ``--steps`` optimizer steps of
``Stage.train_step`` on synthetic MLM + NSP batches without padding (the same batches for every run). It prints:

* the kernels that ran, read from a profile of one training step: LAMB (apex FusedLAMB / DeepSpeed FusedLamb /
  torch foreach), LayerNorm (apex fused / torch native) and the SDPA backend (flash / mem-efficient / cuDNN / math);
  without CUPTI (a CUDA profile with no kernels in it) LAMB and LayerNorm read "unknown (no CUPTI)";
* seq/s and MFU: model FLOP/s (``model.flops_per_token`` x tokens/s) over the device's dense peak for the precision
  (``PEAK_TFLOPS``: V100, A100, H100, H200 by their exact device names; another GPU is an "unknown GPU", no MFU);
* the pruned / dense step-time ratio beside the FLOP ratio;
* the loss after ``--steps`` steps in bf16 and fp16 against fp32 (same initial weights, same batches).

Dropout is off, so that every precision computes the same function. Step time is the median over the steps after
``--warmup`` (the last step, profiled, left out). The whole check stops starting new runs after
``--budget-s`` seconds and says which it skipped. On a machine without CUDA it prints one line and exits 2;
``--smoke-cpu`` runs the same code on the CPU with a tiny model in fp32 and bf16 (the tests check the plumbing with it;
its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from earlybert_pretrain.config import OptimizerConfig
from earlybert_pretrain.model.bert import DEFAULT_MASKED_FRACTION, BertConfig, BertForPreTraining
from earlybert_pretrain.tickets.draw import random_ticket
from earlybert_pretrain.tickets.prune import prune

NEEDS_CUDA = "gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False here); nothing was run"
PRECISIONS = ("fp32", "bf16", "fp16")

# Dense (no sparsity) peak TFLOP/s from NVIDIA's data sheets, by the exact name torch.cuda.get_device_name() gives
# (``known_gpu`` normalises case, spaces and the "NVIDIA " / "Tesla " prefix older drivers add or leave out). A name
# not listed is an unknown GPU: no MFU, rather than a neighbour's peak (a substring match took "RTX A1000" for an
# A100). fp32 is the CUDA-core rate (PyTorch keeps TF32 off for matmuls by default), tf32 the tensor-core rate used
# when torch.backends.cuda.matmul.allow_tf32 is on. V100 has neither bf16 nor tf32.
_V100_SXM2 = {"fp32": 15.7, "fp16": 125.0}
_V100_PCIE = {"fp32": 14.0, "fp16": 112.0}
_A100 = {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}
_H100_SXM = {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}
_H100_NVL = {"fp32": 60.0, "tf32": 417.5, "bf16": 835.0, "fp16": 835.0}
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "V100-SXM2-16GB": _V100_SXM2, "V100-SXM2-32GB": _V100_SXM2,
    "V100-DGXS-16GB": _V100_SXM2, "V100-DGXS-32GB": _V100_SXM2,
    "V100-PCIE-16GB": _V100_PCIE, "V100-PCIE-32GB": _V100_PCIE,
    "V100S-PCIE-32GB": {"fp32": 16.4, "fp16": 130.0},
    "A100-SXM4-40GB": _A100, "A100-SXM4-80GB": _A100, "A100-PCIE-40GB": _A100, "A100 80GB PCIe": _A100,
    "H100 80GB HBM3": _H100_SXM, "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0},
    "H100 NVL": _H100_NVL,
    "H200": _H100_SXM, "H200 NVL": _H100_NVL,
}
UNKNOWN_GPU = "unknown GPU"
NO_CUPTI = "unknown (no CUPTI)"

# Substrings of profiler event names (aten ops and CUDA kernels) -> the kernel they show, per concern, first match
# wins within a concern's list.
KERNEL_SIGNATURES: dict[str, tuple[tuple[str, str], ...]] = {
    "lamb": (("LAMBStage", "apex FusedLAMB"), ("multi_tensor_lamb", "apex FusedLAMB"),
             ("lamb_cuda_kernel", "DeepSpeed FusedLamb"), ("_foreach_", "torch foreach (unfused)")),
    "layer_norm": (("cuApplyLayerNorm", "apex fused"), ("FusedLayerNorm", "apex fused"),
                   ("native_layer_norm", "torch native")),
    "sdpa": (("_scaled_dot_product_flash_attention_for_cpu", "flash (cpu)"),
             ("_scaled_dot_product_flash_attention", "flash"), ("_flash_attention_forward", "flash"),
             ("flash_attn", "flash-attn"), ("_scaled_dot_product_efficient_attention", "mem-efficient"),
             ("_efficient_attention_forward", "mem-efficient"), ("_scaled_dot_product_cudnn_attention", "cudnn"),
             ("_scaled_dot_product_attention_math", "math")),
}
CUDA_KERNEL_CONCERNS = ("lamb", "layer_norm")


# ---------------------------------------------------------------------------------------------- pure arithmetic


def _normalised(device_name: str) -> str:
    name = " ".join(device_name.split()).lower()
    for prefix in ("nvidia ", "tesla "):
        name = name.removeprefix(prefix)
    return name


def known_gpu(device_name: str) -> str | None:
    """The ``PEAK_TFLOPS`` entry that is exactly ``device_name`` (up to case, spaces and vendor prefix), else None."""
    wanted = _normalised(device_name)
    return next((known for known in PEAK_TFLOPS if _normalised(known) == wanted), None)


def peak_tflops(device_name: str, precision: str, tf32: bool = False) -> float | None:
    """The dense peak TFLOP/s of ``device_name`` in ``precision``; None for an unknown device or a missing mode."""
    known = known_gpu(device_name)
    if known is None:
        return None
    peaks = PEAK_TFLOPS[known]
    mode = "tf32" if precision == "fp32" and tf32 else precision
    return peaks.get(mode, peaks.get("fp32") if mode == "tf32" else None)


def achieved_tflops(sequences_per_second: float, seq_len: int, flops_per_token: float) -> float:
    return sequences_per_second * seq_len * flops_per_token / 1e12


def mfu(sequences_per_second: float, seq_len: int, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak (None without a peak)."""
    if not peak:
        return None
    return achieved_tflops(sequences_per_second, seq_len, flops_per_token) / peak


def classify_kernels(event_names: Iterable[str], cuda_kernels_recorded: bool = True) -> dict[str, str]:
    """Which LAMB, LayerNorm and SDPA kernels a profile shows; "none seen" where none of the signatures occurs.

    Each event counts as the first signature it contains (the CPU flash op's name contains the CUDA one's). A fused
    LAMB or LayerNorm shows only as CUDA kernels, which the profiler records through CUPTI: a CUDA profile without any
    (``cuda_kernels_recorded`` False) cannot tell them from torch's, so those two read NO_CUPTI. SDPA's choice is an
    aten op, recorded on the host either way."""
    names = set(event_names)
    found = {}
    for concern, signatures in KERNEL_SIGNATURES.items():
        if not cuda_kernels_recorded and concern in CUDA_KERNEL_CONCERNS:
            found[concern] = NO_CUPTI
            continue
        kinds = [kind for _, kind in signatures]
        seen = {next((kind for signature, kind in signatures if signature in name), None) for name in names}
        ordered = sorted(seen - {None}, key=kinds.index)
        if concern == "lamb":
            ordered = ordered[:1]  # a fused LAMB run still shows foreach ops (DeepSpeed's own bookkeeping)
        found[concern] = " + ".join(ordered) if ordered else "none seen"
    return found


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table, every cell as str()."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- one training run


@dataclass(frozen=True)
class RunSpec:
    seq_len: int
    precision: str
    model: str  # "dense" | "ticket"
    batch: int
    lamb_kernel: str = "auto"
    extra: bool = False  # the one DeepSpeed-FusedLamb run, left out of the ratio and loss tables


@dataclass
class RunResult:
    spec: RunSpec
    flops_per_token: float
    batch: int = 0
    step_seconds: float | None = None
    losses: list[float] = field(default_factory=list)
    kernels: dict[str, str] = field(default_factory=dict)
    chosen_optimizer: str = ""
    note: str = ""

    @property
    def sequences_per_second(self) -> float | None:
        return self.batch / self.step_seconds if self.step_seconds else None


def model_config(smoke: bool) -> BertConfig:
    """BERT-base (or a tiny model with 12 heads, so that the 4-head ticket exists) without dropout: the runs in each
    precision then compute the same function on the same batches, and the loss difference is the precision's."""
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    if smoke:
        return BertConfig(vocab_size=512, hidden_size=96, num_hidden_layers=2, num_attention_heads=12,
                          intermediate_size=192, **no_dropout)
    return BertConfig(**no_dropout)


def build_models(config: BertConfig, seed: int = 0) -> dict[str, BertForPreTraining]:
    """Dense BERT and its 4-heads/30%-FFN global random ticket (pruned from the same initial weights)."""
    torch.manual_seed(seed)
    dense = BertForPreTraining(config)
    ticket = random_ticket(config, heads_to_prune=4, ffn_ratio=0.3, ffn_scope="global", seed=seed)
    return {"dense": dense, "ticket": prune(dense, ticket)}


def make_batch(config: BertConfig, batch: int, seq_len: int, index: int) -> dict[str, torch.Tensor]:
    """Synthetic MLM + NSP micro-batch ``index``: no padding, 20/128 of the positions predicted, fixed by the index."""
    generator = torch.Generator().manual_seed(1000 + index)
    input_ids = torch.randint(5, config.vocab_size, (batch, seq_len), generator=generator)
    labels = torch.full_like(input_ids, -100)
    predicted = torch.rand(batch, seq_len, generator=generator).argsort(dim=1)
    predicted = predicted[:, : max(1, round(seq_len * DEFAULT_MASKED_FRACTION))]
    labels.scatter_(1, predicted, input_ids.gather(1, predicted))
    return {"input_ids": input_ids, "token_type_ids": (torch.arange(seq_len) >= seq_len // 2).long().expand(batch, -1),
            "attention_mask": torch.ones(batch, seq_len, dtype=torch.long), "labels": labels,
            "next_sentence_label": torch.randint(0, 2, (batch,), generator=generator)}


def profiled(step, *args) -> tuple[object, list[str], bool]:
    """``step(*args)`` under the profiler (CPU ops, and CUDA kernels on a GPU): its value, every event's name, and
    whether CUDA kernels were recorded (False on a GPU without a working CUPTI; True on the CPU, where ops are all)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        value = step(*args)
    events = prof.events()
    recorded = not on_cuda or any(event.device_type == DeviceType.CUDA for event in events)
    return value, [event.name for event in events], recorded


def train(model: BertForPreTraining, spec: RunSpec, batch: int, runtime, steps: int, warmup: int) -> RunResult:
    """``steps`` optimizer steps on the project backend; the steps after ``warmup`` are timed but the last, which is
    profiled (late, so that fp16's loss scale has settled and the optimizer step is not skipped for an overflow)."""
    from earlybert_pretrain.train.stage import Schedule, Stage, StageSettings

    settings = StageSettings(
        name=f"gpu_check_{spec.precision}_{spec.seq_len}_{spec.model}", seed=0, global_batch_size=batch,
        micro_batch_size=batch, optimizer=OptimizerConfig(fused=spec.lamb_kernel), lr=1e-3,
        schedule=Schedule(total_steps=steps, warmup=0.2), grad_clip=1.0)
    result = RunResult(spec, model.flops_per_token(spec.seq_len), batch)
    seconds = []
    with Stage.build(model, settings, runtime) as stage:
        result.chosen_optimizer = str(stage.description.get("optimizer_kernel", "?"))
        for index in range(steps):
            micro_batch = {key: value.to(runtime.device) for key, value in
                           make_batch(model.config, batch, spec.seq_len, index).items()}
            if index == steps - 1:
                means, names, recorded = profiled(stage.train_step, [micro_batch])
                result.kernels = classify_kernels(names, recorded)
            else:
                means = stage.train_step([micro_batch])
                if index >= warmup:
                    seconds.append(stage.timer.last_seconds)
            result.losses.append(means["loss"])
    result.step_seconds = statistics.median(seconds) if seconds else None
    return result


def train_or_note(models: dict[str, BertForPreTraining], spec: RunSpec, runtime, steps: int,
                  warmup: int) -> RunResult:
    """``train`` on a fresh copy of the model (DeepSpeed casts in place); on CUDA OOM retry once at half the batch.
    A run that fails otherwise (e.g. optimizer.fused=apex without Apex) becomes a note, its traceback on stderr, so
    that the other runs still report."""
    batch, flops = spec.batch, models[spec.model].flops_per_token(spec.seq_len)
    for attempt in range(2):
        try:
            result = train(copy.deepcopy(models[spec.model]), spec, batch, runtime, steps, warmup)
        except torch.cuda.OutOfMemoryError:
            batch = max(1, batch // 2)
            continue
        except Exception as err:  # reported in the table, the traceback kept on stderr
            traceback.print_exc()
            first_line = (str(err).splitlines() or [""])[0][:160]
            return RunResult(spec, flops, batch, note=f"failed: {type(err).__name__}: {first_line}")
        if attempt:
            result.note = f"out of memory at batch {spec.batch}; ran batch {batch}"
        return result
    return RunResult(spec, flops, note=f"out of memory at batch {spec.batch} and {batch * 2}; lower --tokens-per-step")


# ---------------------------------------------------------------------------------------------- the report


def describe_device(runtime) -> tuple[str, list[str]]:
    """The device name and header lines: versions, capability, and the fused kernels installed."""
    import deepspeed

    lines = [f"torch {torch.__version__} (CUDA {torch.version.cuda}), deepspeed {deepspeed.__version__}"]
    if runtime.device.type != "cuda":
        return "cpu", lines + ["device: cpu (--smoke-cpu: plumbing check only, the numbers mean nothing)"]
    name = torch.cuda.get_device_name(runtime.device)
    major, minor = torch.cuda.get_device_capability(runtime.device)
    memory = torch.cuda.get_device_properties(runtime.device).total_memory / 2**30
    prebuilt = ", ".join(op for op in ("fused_lamb", "fused_adam") if deepspeed_prebuilt(op)) or "none"
    known = known_gpu(name)
    peaks = f"peaks of {known}" if known else f"{UNKNOWN_GPU}: not in gpu_check.PEAK_TFLOPS, MFU not computed"
    lines.append(f"device: {name} (sm_{major}{minor}, {memory:.0f} GiB; {peaks})")
    lines.append(f"DeepSpeed ops compiled at install: {prebuilt}; NVIDIA Apex FusedLAMB (amp_C): "
                 f"{'yes' if apex_installed() else 'no'}")
    return name, lines


def deepspeed_prebuilt(op: str) -> bool:
    """Whether DeepSpeed's ``op`` was compiled when it was installed (DS_BUILD_...=1), not left to JIT."""
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        return False
    return bool(installed_ops.get(op))


def apex_installed() -> bool:
    try:
        import amp_C  # noqa: F401  (the CUDA extension FusedLAMB needs)
        from apex.optimizers import FusedLAMB  # noqa: F401
    except ImportError:
        return False
    return True


def run_table(results: Sequence[RunResult], device_name: str) -> str:
    rows = []
    tf32 = torch.backends.cuda.matmul.allow_tf32
    for r in results:
        seq_s = r.sequences_per_second
        peak = peak_tflops(device_name, r.spec.precision, tf32)
        peak_cell = UNKNOWN_GPU if device_name != "cpu" and known_gpu(device_name) is None else fmt(peak, ".1f")
        rows.append([r.spec.seq_len, r.spec.precision, r.spec.model, r.spec.lamb_kernel, r.batch,
                     fmt(r.step_seconds and r.step_seconds * 1e3, ".1f"), fmt(seq_s, ".1f"),
                     fmt(seq_s and achieved_tflops(seq_s, r.spec.seq_len, r.flops_per_token), ".1f"),
                     peak_cell, fmt(seq_s and mfu(seq_s, r.spec.seq_len, r.flops_per_token, peak), ".1%"),
                     r.chosen_optimizer, r.kernels.get("lamb", "-"), r.kernels.get("layer_norm", "-"),
                     r.kernels.get("sdpa", "-"), r.note])
    return format_table(["seq", "precision", "model", "optimizer.fused", "batch", "step ms", "seq/s", "TFLOP/s",
                         "peak", "MFU", "chosen LAMB", "LAMB ran", "LayerNorm", "SDPA", "note"], rows)


def ratio_table(results: Sequence[RunResult]) -> str:
    by_key = {(r.spec.seq_len, r.spec.precision, r.spec.model): r for r in results if not r.spec.extra}
    rows = []
    for (seq_len, precision, model), ticket in by_key.items():
        dense = by_key.get((seq_len, precision, "dense"))
        if model != "ticket" or dense is None or not (dense.step_seconds and ticket.step_seconds):
            continue
        # per sequence, in case an out-of-memory retry ran one of the two at a smaller batch
        measured = (ticket.step_seconds / ticket.batch) / (dense.step_seconds / dense.batch)
        predicted = ticket.flops_per_token / dense.flops_per_token
        rows.append([seq_len, precision, f"{measured:.3f}", f"{predicted:.3f}", f"{measured / predicted:.3f}"])
    return format_table(["seq", "precision", "pruned/dense step time", "FLOP ratio", "time / FLOP"], rows)


def loss_table(results: Sequence[RunResult], steps: int) -> str:
    seq_len = results[0].spec.seq_len if results else None
    dense = {r.spec.precision: r for r in results
             if r.spec.model == "dense" and not r.spec.extra and len(r.losses) == steps
             and r.spec.seq_len == seq_len}
    reference = dense.get("fp32")
    rows = []
    for precision, r in dense.items():
        difference = r.losses[-1] - reference.losses[-1] if reference else None
        rows.append([r.spec.seq_len, precision, f"{r.losses[0]:.4f}", f"{r.losses[-1]:.4f}", fmt(difference, "+.4f"),
                     fmt(difference and difference / reference.losses[-1], "+.2%")])
    return format_table(["seq", "precision", "loss step 1", f"loss step {steps}", "vs fp32", "relative"], rows)


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run (the loss comparison's step)")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--tokens-per-step", type=int, default=8192, help="batch = this / seq (64 at 128, 16 at 512)")
    parser.add_argument("--seqs", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS,
                        help="of these, the ones the device runs")
    parser.add_argument("--lamb-kernel", default="auto", choices=("auto", "apex", "deepspeed", "torch"),
                        help="optimizer.fused for the main runs")
    parser.add_argument("--budget-s", type=float, default=450.0, help="start no run after this many seconds")
    parser.add_argument("--smoke-cpu", action="store_true", help="tiny model on the CPU: a plumbing check only")
    return parser.parse_args(argv)


def plan_runs(args: argparse.Namespace, precisions: Sequence[str]) -> list[RunSpec]:
    """Every (seq, precision, model) at optimizer.fused=--lamb-kernel, then DeepSpeed's FusedLamb once if built."""
    specs = [RunSpec(seq_len, precision, model, max(1, args.tokens_per_step // seq_len), args.lamb_kernel)
             for seq_len in args.seqs for precision in precisions for model in ("dense", "ticket")]
    if torch.cuda.is_available() and args.lamb_kernel != "deepspeed" and not args.smoke_cpu:
        if deepspeed_prebuilt("fused_lamb"):
            specs.append(RunSpec(args.seqs[0], "fp32", "dense", max(1, args.tokens_per_step // args.seqs[0]),
                                 "deepspeed", extra=True))
    return specs


def usable_precisions(device: torch.device) -> tuple[list[str], list[str]]:
    """The precisions this device runs, and a note for each one it skips."""
    if device.type != "cuda":
        return ["fp32", "bf16"], ["fp16 skipped: DeepSpeed's CPU accelerator has no fp16"]
    if not torch.cuda.is_bf16_supported():
        return ["fp32", "fp16"], [f"bf16 skipped: {torch.cuda.get_device_name(device)} has no bf16 (V100: fp16)"]
    return list(PRECISIONS), []


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke_cpu and not torch.cuda.is_available():
        print(NEEDS_CUDA, file=sys.stderr)
        return 2
    if args.smoke_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from earlybert_pretrain.train.engine import init_distributed
    from earlybert_pretrain.train.stage import Runtime

    start = time.perf_counter()
    rank, world_size, device = init_distributed()
    precisions, notes = usable_precisions(device)
    precisions = [precision for precision in precisions if precision in args.precisions]
    device_name, header = describe_device(Runtime(rank, world_size, device, "fp32"))
    print("\n".join(header + notes), flush=True)
    models = build_models(model_config(args.smoke_cpu))
    results, skipped = [], []
    for spec in plan_runs(args, precisions):
        name = f"seq {spec.seq_len} {spec.precision} {spec.model} optimizer.fused={spec.lamb_kernel}"
        if time.perf_counter() - start > args.budget_s:
            skipped.append(f"skipped (time budget {args.budget_s:.0f} s): {name}")
            continue
        runtime = Runtime(rank, world_size, device, spec.precision)
        results.append(train_or_note(models, spec, runtime, args.steps, args.warmup))
        print(f"done: {name} ({time.perf_counter() - start:.0f} s)", flush=True)
    if skipped:
        print("\n".join(skipped))
    print(f"\nBERT {'tiny (smoke)' if args.smoke_cpu else 'base'} without dropout, {args.steps} steps per run, median "
          f"step time after {args.warmup} warm-up steps; MFU against the dense peak (TF32 "
          f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'} for fp32)\n")
    print(run_table(results, device_name) + "\n")
    print(ratio_table(results) + "\n")
    print(loss_table(results, args.steps))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
