"""LAMB (You et al. 2020) as NVIDIA trains BERT with it, and the choice of a fused CUDA kernel.

The algorithm, per tensor w with gradient g at step t (paper Sec. 4.1 trains with it; NVIDIA's recipe):

    m = b1 m + (1 - b1) g                 v = b2 v + (1 - b2) g^2
    u = m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + wd * w          (decoupled weight decay inside the update)
    r = ||w|| / ||u||  (1.0 when either norm is 0)                        (the per-tensor trust ratio)
    w = w - lr * r * u

As in apex's FusedLAMB (NVIDIA's BERT) and Google's reference LAMB, the trust ratio is applied only to tensors that
are decayed; ``use_nvlamb=True`` applies it to every tensor (apex's NVLAMB). Gradient clipping is not part of the
optimizer: the DeepSpeed engine clips the global norm before ``step`` (``gradient_clipping``), for every kernel.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from earlybert_pretrain.config import OptimizerConfig
from earlybert_pretrain.errors import ConfigError

logger = logging.getLogger(__name__)

KERNELS = ("auto", "apex", "deepspeed", "torch")


class Lamb(torch.optim.Optimizer):
    """LAMB with Adam bias correction, decoupled weight decay and a per-tensor trust ratio (torch._foreach ops).

    Each param group carries its own ``weight_decay`` (see ``weight_decay_groups``); state per parameter is
    ``step`` (int), ``exp_avg`` and ``exp_avg_sq`` (fp32 like the parameters DeepSpeed hands us). Under ZeRO 1/2 a
    group's one parameter is a flat partition; ``partition_layouts`` (train/zero_lamb.py) keeps the ratio per tensor.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, use_nvlamb: bool = False):
        if lr < 0.0:
            raise ConfigError(f"Lamb: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ConfigError(f"Lamb: betas must be in [0, 1), got {betas}")
        if eps <= 0.0:
            raise ConfigError(f"Lamb: eps must be > 0, got {eps}")
        if weight_decay < 0.0:
            raise ConfigError(f"Lamb: weight_decay must be >= 0, got {weight_decay}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.use_nvlamb = use_nvlamb
        # Under ZeRO 1/2: flat partition id -> zero_lamb.PartitionLayout (set after deepspeed.initialize).
        self.partition_layouts: dict = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update_group(group, params)
        return loss

    def _update_group(self, group: dict, params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        grads = []
        for param in params:
            if param.grad.is_sparse:
                raise RuntimeError("Lamb does not support sparse gradients")
            grads.append(param.grad)
            state = self.state[param]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["step"] += 1
        states = [self.state[p] for p in params]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        # Steps can differ between tensors only when some had no gradient on some step; keep them per tensor.
        bias_corrections1 = [1.0 - beta1 ** s["step"] for s in states]
        bias_corrections2 = [1.0 - beta2 ** s["step"] for s in states]

        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)

        denominators = torch._foreach_div(exp_avg_sqs, bias_corrections2)
        torch._foreach_sqrt_(denominators)
        torch._foreach_add_(denominators, group["eps"])
        updates = torch._foreach_div(exp_avgs, bias_corrections1)
        torch._foreach_div_(updates, denominators)
        weight_decay = group["weight_decay"]
        if weight_decay != 0.0:
            torch._foreach_add_(updates, params, alpha=weight_decay)

        if self.use_nvlamb or weight_decay != 0.0:
            self._apply_trust_ratios(params, updates)
        torch._foreach_add_(params, updates, alpha=-group["lr"])

    def _apply_trust_ratios(self, params: list[torch.Tensor], updates: list[torch.Tensor]) -> None:
        layout = self.partition_layouts.get(id(params[0]))
        if layout is not None and layout.partition is params[0]:  # a ZeRO partition: norms per original tensor
            layout.apply_trust_ratios(params[0], updates[0])
            return
        weight_norms = torch._foreach_norm(params)
        update_norms = torch._foreach_norm(updates)
        # Trust ratios stay tensors (no host sync): 1.0 where either norm is zero.
        ratios = [torch.where((w > 0) & (u > 0), w / u, torch.ones_like(w))
                  for w, u in zip(weight_norms, update_norms)]
        torch._foreach_mul_(updates, ratios)


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two param groups: decayed weights, and biases / LayerNorm weights / slimming coefficients without decay.

    Slimming coefficients carry their own L1 penalty (paper Sec. 3.2); decaying them too would change the search.
    Tied parameters (the MLM decoder and the word embeddings) appear once. Empty groups are left out.
    """
    no_decay_ids = set()
    for module in model.modules():
        is_norm = "LayerNorm" in type(module).__name__
        for name, param in module.named_parameters(recurse=False):
            if is_norm or name == "bias":
                no_decay_ids.add(id(param))
    if hasattr(model, "slimming_coefficients"):
        no_decay_ids.update(id(coefficients) for _, _, coefficients in model.slimming_coefficients())
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if id(param) in no_decay_ids else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def _apex_lamb(groups: list[dict], cfg: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    """apex FusedLAMB configured to compute ``Lamb`` exactly (checked against apex csrc/multi_tensor_lamb.cu):
    bias_correction=True and grad_averaging=True (m uses 1 - b1, both moments bias-corrected, eps outside the sqrt);
    adam_w_mode=True (decay added to the update, not the gradient); use_nvlamb=False (trust ratio only where
    weight_decay != 0, as ours); max_grad_norm=inf turns its internal global-norm clipping off because the engine
    already clips (its kernel divides by norm / max_grad_norm only when norm > max_grad_norm).
    """
    from apex.optimizers import FusedLAMB

    return FusedLAMB(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                     bias_correction=True, grad_averaging=True, adam_w_mode=True, max_grad_norm=math.inf,
                     use_nvlamb=False)


def _deepspeed_lamb(groups: list[dict], cfg: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    """DeepSpeed's FusedLamb, only on explicit request: it is a different LAMB variant, so ``auto`` never picks it.

    Checked against deepspeed/ops/csrc/lamb/fused_lamb_cuda_kernel.cu (0.19): it folds bias correction into the step
    size (lr * sqrt(1 - b2^t) / (1 - b1^t)) and computes the trust ratio on the uncorrected m / (sqrt(v) + eps) +
    wd * w, so decay and eps weigh differently in early steps; it applies the ratio to every tensor (no-decay ones
    too) and clamps it to [min_coeff, max_coeff]. We remove the clamp (0, inf) and its clipping (max_grad_norm=0:
    the engine clips); the remaining differences are inherent to the kernel.
    """
    from deepspeed.ops.lamb import FusedLamb

    try:
        optimizer = FusedLamb(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                              bias_correction=True, max_grad_norm=0.0, max_coeff=math.inf, min_coeff=0.0)
    except Exception as err:  # the op builder raises assorted errors (no nvcc, incompatible CUDA, ...)
        raise ConfigError(f"optimizer.fused=deepspeed: DeepSpeed's fused_lamb op cannot be built or loaded here "
                          f"({err}); build it with DS_BUILD_FUSED_LAMB=1, or use optimizer.fused=auto") from err
    logger.warning("optimizer.fused=deepspeed: DeepSpeed's FusedLamb differs from apex/our LAMB in bias correction "
                   "and where the trust ratio applies (see earlybert_pretrain/optim.py)")
    return optimizer


def _apex_available() -> bool:
    try:
        import amp_C  # noqa: F401  (the CUDA extension FusedLAMB needs; apex can be installed without it)
        from apex.optimizers import FusedLAMB  # noqa: F401
    except ImportError:
        return False
    return True


def _on_cuda(model: nn.Module) -> bool:
    return any(p.is_cuda for p in model.parameters())


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, lr: float,
                    zero_stage: int = 0) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer for ``model`` (already on its training device) and the name of its kernel, for the run log.

    ``cfg.name``: lamb | adamw (torch AdamW, for fine-tuning). ``cfg.fused``: auto = apex FusedLAMB on CUDA when
    installed, else ours ("torch-foreach"); apex | deepspeed force that kernel (an error when it is absent); torch
    forces ours. Under ZeRO 1/2 LAMB is ours: only it takes per-tensor trust ratios over partitions (zero_lamb.py).
    """
    groups = weight_decay_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps), "torch-adamw"
    if cfg.name != "lamb":
        raise ConfigError(f"optimizer.name: expected 'lamb' or 'adamw', got {cfg.name!r}")
    if cfg.fused not in KERNELS:
        raise ConfigError(f"optimizer.fused: expected one of {', '.join(KERNELS)}, got {cfg.fused!r}")
    on_cuda = _on_cuda(model)
    if cfg.fused in ("apex", "deepspeed") and zero_stage >= 1:
        raise ConfigError(f"optimizer.fused={cfg.fused} with engine.zero_stage={zero_stage}: a fused LAMB kernel sees "
                          "ZeRO's flat partitions and would take the trust ratio per partition, not per tensor; use "
                          "optimizer.fused=auto (our per-tensor LAMB under ZeRO)")
    if cfg.fused in ("apex", "deepspeed") and not on_cuda:
        raise ConfigError(f"optimizer.fused={cfg.fused}: fused LAMB kernels run on CUDA only and the model is on the "
                          "CPU; use optimizer.fused=torch (or auto)")
    if cfg.fused == "apex" or (cfg.fused == "auto" and zero_stage == 0 and on_cuda and _apex_available()):
        if not _apex_available():
            raise ConfigError("optimizer.fused=apex: NVIDIA Apex with its CUDA extensions (amp_C) is not installed "
                              "(the PyPI package 'apex' is unrelated); use optimizer.fused=auto")
        return _apex_lamb(groups, cfg, lr), "apex-fused-lamb"
    if cfg.fused == "deepspeed":
        return _deepspeed_lamb(groups, cfg, lr), "deepspeed-fused-lamb"
    return Lamb(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay), "torch-foreach"
