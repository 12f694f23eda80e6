"""``earlybert-pretrain --dry-run``: what a run will do, computed from the config alone, before any GPU hour is spent.

The plan: accumulation per phase for a world size, steps per stage (search, phase 1, phase 2, the 80% rule of
Sec. 4.3), training FLOPs from the geometry (``model.bert.flops_per_token``; a ticket's geometry from the drawing
rule's counts, which fix the FLOPs), and a per-GPU memory estimate against a named GPU. Nothing is created or read
besides the config.

Memory per GPU, in bytes (P parameters, N ranks, b micro-batch, s sequence length, L layers, h hidden):
* the model's state, ``train.memory.memory_budget``: weights 4P (fp32 parameters: bf16/fp16 run as autocast over
  them), gradients 4P (ZeRO 2: a 4P/N partition), LAMB's two moments 8P (ZeRO 1/2: 12P/N with DeepSpeed's fp32
  master partition), DeepSpeed's buckets (``engine.reduce_bucket_size`` / ``allgather_bucket_size``; ZeRO 0: its
  flat all-reduce copy);
* activations stored for the backward pass, per layer, after Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models", Sec. 4.1) generalised to kept heads and FFN widths: with a bytes per
  activation (2 under autocast, 4 in fp32) and 1-byte dropout masks, attention stores a*s*b*(2h + 4k) + s*b*h
  (k = kept heads x head size: input, Q, K, V, output projection input, dropout mask), the FFN a*s*b*(h + 2f) +
  s*b*h, the two LayerNorms 2a*s*b*h; memory-efficient / flash SDPA keeps no s x s matrix (the math kernel, used in
  fp32, adds 2.5a*heads*s^2*b: scores, their dropout mask and output); plus the embeddings' output and the sparse MLM
  head's fp32 logits over ``max_predictions`` positions;
* a fixed reserve for the CUDA context and the caching allocator (``CUDA_RESERVE``).
It is an estimate: the real peak depends on the kernels chosen and allocator fragmentation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import yaml

from earlybert_pretrain.config import PretrainConfig, config_to_dict
from earlybert_pretrain.errors import ConfigError
from earlybert_pretrain.model.bert import BertConfig, flops_per_token, parameter_counts
from earlybert_pretrain.pretrain.recipe import phase_steps
from earlybert_pretrain.tickets.draw import random_ticket
from earlybert_pretrain.train.memory import memory_budget

GIB = 1024**3
MIB = 1024**2
# Total memory as nvidia-smi reports it (MiB), and whether the GPU has bf16 (compute capability >= 8.0).
GPUS = {
    "V100-16GB": (16_160, False), "V100-32GB": (32_510, False), "A100-40GB": (40_960, True),
    "A100-80GB": (81_920, True), "H100-80GB": (81_559, True), "H200": (143_771, True),
}
CUDA_RESERVE = int(1.5 * GIB)  # CUDA context, cuBLAS workspaces, allocator slack
DROPOUT_MASK_BYTES = 1


@dataclass(frozen=True)
class PhasePlan:
    name: str
    seq_len: int
    global_batch_size: int
    micro_batch_size: int
    accumulation: int
    steps: int  # this run's steps (the search: its cap)
    flops: float


def trained_geometry(cfg: PretrainConfig) -> BertConfig:
    """The geometry phases 1 and 2 train: the dense model, or one with a drawn ticket's counts (every ticket the
    drawing rules allow has the same heads per layer and total FFN width, hence the same FLOPs)."""
    if cfg.mode in ("dense", "reduced"):
        return cfg.model
    ticket = random_ticket(cfg.model, cfg.search.heads_to_prune_for(cfg.model), cfg.search.ffn_ratio,
                           cfg.search.ffn_scope, ffn_multiple_of=cfg.search.ffn_multiple_of)
    return ticket.pruned_config(cfg.model)


def plan(cfg: PretrainConfig, world_size: int, geometry: BertConfig | None = None) -> list[PhasePlan]:
    """Search (earlybert), phase 1 and phase 2: batch geometry, accumulation, steps and training FLOPs."""
    geometry = geometry or trained_geometry(cfg)
    dense_steps, steps = phase_steps(cfg, dense=True), phase_steps(cfg, dense=geometry is cfg.model)
    stages = []
    if cfg.mode == "earlybert":
        stages.append(("search", cfg.phase1, min(cfg.search.steps, dense_steps["phase1"])))
    stages += [("phase1", cfg.phase1, steps["phase1"]), ("phase2", cfg.phase2, steps["phase2"])]
    plans = []
    for name, phase, count in stages:
        per_step = phase.micro_batch_size * world_size
        if phase.global_batch_size % per_step:
            raise ConfigError(f"{name if name != 'search' else 'phase1'}.global_batch_size={phase.global_batch_size} "
                              f"is not divisible by micro_batch_size x world size = {per_step}")
        tokens = phase.global_batch_size * phase.seq_len
        model = stage_model(cfg, name, geometry)
        plans.append(PhasePlan(name, phase.seq_len, phase.global_batch_size, phase.micro_batch_size,
                               phase.global_batch_size // per_step, count,
                               count * tokens * flops_per_token(model, phase.seq_len,
                                                                phase.max_predictions / phase.seq_len)))
    return plans


def stage_model(cfg: PretrainConfig, stage: str, geometry: BertConfig) -> BertConfig:
    """The search trains the dense model with slimming coefficients; the phases the trained geometry."""
    return dataclasses.replace(cfg.model, slimming=True) if stage == "search" else geometry


def activation_bytes(model: BertConfig, micro_batch: int, seq_len: int, max_predictions: int, precision: str,
                     attention_kernel_stores_scores: bool) -> int:
    """Activations one micro-batch stores for its backward pass (see the module docstring)."""
    a = 4 if precision == "fp32" else 2
    b, s, h, mask = micro_batch, seq_len, model.hidden_size, DROPOUT_MASK_BYTES
    total = a * s * b * h + mask * s * b * h  # the embeddings' output and its dropout mask
    for heads, width in zip(model.heads_per_layer, model.ffn_per_layer):
        kept = heads * model.head_size
        attention = a * s * b * (2 * h + 4 * kept) + mask * s * b * h
        if attention_kernel_stores_scores:
            attention += int(2.5 * a * heads * s * s * b)
        ffn = a * s * b * (h + 2 * width) + mask * s * b * h
        total += attention + ffn + 2 * a * s * b * h
    mlm_logits = b * max_predictions * model.vocab_size
    return total + 3 * 4 * mlm_logits  # fp32 logits, their softmax and its gradient


def memory_estimate(cfg: PretrainConfig, world_size: int, precision: str, micro_batches: dict[str, int] | None = None,
                    geometry: BertConfig | None = None) -> dict[str, dict[str, int]]:
    """Per stage: bytes per GPU by component and the total; ``micro_batches`` overrides the config's per stage."""
    estimates = {}
    geometry = geometry or trained_geometry(cfg)
    for item in plan(cfg, world_size, geometry):
        model = stage_model(cfg, item.name, geometry)
        phase = cfg.phase1 if item.name in ("search", "phase1") else cfg.phase2
        micro = (micro_batches or {}).get(item.name, item.micro_batch_size)
        memory = memory_budget(parameter_counts(model)["total"], world_size, cfg.engine.zero_stage,
                               cfg.engine.reduce_bucket_size, cfg.engine.allgather_bucket_size)
        memory["activations"] = activation_bytes(model, micro, item.seq_len, phase.max_predictions, precision,
                                                 attention_kernel_stores_scores=precision == "fp32")
        memory["cuda_reserve"] = CUDA_RESERVE
        memory["total"] = sum(memory.values())
        estimates[item.name] = memory
    return estimates


def largest_micro_batch(cfg: PretrainConfig, world_size: int, precision: str, stage: str, capacity: int) -> int:
    """The largest micro-batch that divides the stage's global batch over the ranks and fits ``capacity``; 0 if none."""
    geometry = trained_geometry(cfg)
    item = next(p for p in plan(cfg, world_size, geometry) if p.name == stage)
    per_rank = item.global_batch_size // world_size
    for micro in sorted((d for d in range(1, per_rank + 1) if per_rank % d == 0), reverse=True):
        estimate = memory_estimate(cfg, world_size, precision, {stage: micro}, geometry)
        if estimate[stage]["total"] <= capacity:
            return micro
    return 0


def resolve_gpu(name: str) -> tuple[int, bool]:
    if name not in GPUS:
        raise ConfigError(f"--gpu: unknown GPU {name!r}; expected one of {', '.join(GPUS)}")
    total_mib, has_bf16 = GPUS[name]
    return total_mib * MIB, has_bf16


def dry_run_precision(requested: str, has_bf16: bool) -> str:
    """The precision the run would use on that GPU (``auto``: bf16 where the GPU has it, else fp16)."""
    if requested == "auto":
        return "bf16" if has_bf16 else "fp16"
    if requested == "bf16" and not has_bf16:
        raise ConfigError("engine.precision=bf16: this GPU has no bf16 (e.g. V100); use engine.precision=fp16")
    return requested


def report(cfg: PretrainConfig, world_size: int, gpu: str) -> tuple[str, bool]:
    """The dry run's text, and whether every stage fits the GPU."""
    capacity, has_bf16 = resolve_gpu(gpu)
    precision = dry_run_precision(cfg.engine.precision, has_bf16)
    geometry = trained_geometry(cfg)
    plans = plan(cfg, world_size, geometry)
    memory = memory_estimate(cfg, world_size, precision, geometry=geometry)
    lines = ["resolved config:", yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip(), "",
             f"world size {world_size}, {gpu} ({capacity / GIB:.1f} GiB), precision {precision}, "
             f"ZeRO {cfg.engine.zero_stage}, mode {cfg.mode}",
             f"{'stage':8} {'seq':>4} {'global':>7} {'micro':>5} {'accum':>6} {'steps':>6} {'PFLOPs':>10} "
             f"{'GiB/GPU':>8}"]
    fits = True
    for item in plans:
        total = memory[item.name]["total"]
        lines.append(f"{item.name:8} {item.seq_len:>4} {item.global_batch_size:>7} {item.micro_batch_size:>5} "
                     f"{item.accumulation:>6} {item.steps:>6} {item.flops / 1e15:>10.1f} {total / GIB:>8.2f}")
    dense_steps = phase_steps(cfg, dense=True)
    lines.append(f"default (dense) steps: phase1 {dense_steps['phase1']}, phase2 {dense_steps['phase2']}; "
                 f"this run trains {cfg.pruned_step_fraction:.0%} of them with a ticket (Sec. 4.3)"
                 if cfg.mode not in ("dense", "reduced") else
                 f"dense steps: phase1 {dense_steps['phase1']}, phase2 {dense_steps['phase2']}")
    lines.append(f"training FLOPs: {sum(p.flops for p in plans) / 1e18:.2f} EFLOPs in all")
    for item in plans:
        parts = ", ".join(f"{name} {value / GIB:.2f}" for name, value in memory[item.name].items() if name != "total")
        lines.append(f"memory {item.name} (GiB): {parts}")
        if memory[item.name]["total"] > capacity:
            fits = False
            best = largest_micro_batch(cfg, world_size, precision, item.name, capacity)
            phase = "phase1" if item.name in ("search", "phase1") else "phase2"
            advice = (f"the largest micro-batch that fits is {best} ({phase}.micro_batch_size={best})" if best
                      else "no micro-batch fits: use more ranks with engine.zero_stage=2, or a larger GPU")
            lines.append(f"WARNING: {item.name} needs ~{memory[item.name]['total'] / GIB:.1f} GiB per GPU, more than "
                         f"the {gpu}'s {capacity / GIB:.1f} GiB; {advice}")
    return "\n".join(lines), fits
