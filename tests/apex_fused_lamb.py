"""apex.optimizers.FusedLAMB for the CPU tests: apex's Python driver and CUDA kernel transcribed statement by statement.

Sources (NVIDIA/apex at 6424da3b4faa6c8f062da4a48c424fff3f02d42d):
  apex/optimizers/fused_lamb.py      FusedLAMB.__init__ / zero_grad / step (lines 63-244): the global gradient norm
                                     over every group, one ``step`` counter per param group, one kernel call per group
  csrc/multi_tensor_lamb.cu          multi_tensor_lamb_cuda (lines 269-320): bias corrections and beta3 on the host,
                                     per-tensor parameter norms BEFORE stage 1, the update written over the gradient,
                                     per-tensor update norms; LAMBStage1Functor (lines 38-194, MATH_T = float) and
                                     LAMBStage2Functor (lines 197-267)
Only the fp32 branch is kept (the tests train fp32); everything else, including apex's unusual choices (the update
left in ``p.grad``, the trust ratio only where weight_decay != 0 unless use_nvlamb), is as apex does it. This is a
reference for ``earlybert_pretrain.train.optim``: it must not import from it.
"""

from __future__ import annotations

import math

import torch

MOMENT_MODE_0 = 0  # L2 regularization mode (adam_w_mode=False)
MOMENT_MODE_1 = 1  # decoupled weight decay (adam_w_mode=True)


def _f32(value: float) -> float:
    """A host-side float as the kernel's ``const float`` argument receives it."""
    return torch.tensor(value, dtype=torch.float32).item()


def _lamb_stage1(g, p, m, v, beta1, beta2, beta3, beta1_correction, beta2_correction, epsilon, mode, decay,
                 global_grad_norm, max_global_grad_norm) -> None:
    """LAMBStage1Functor: g <- the update (m and v advanced in place)."""
    clipped_global_grad_norm = (global_grad_norm / max_global_grad_norm if global_grad_norm > max_global_grad_norm
                                else torch.ones((), dtype=torch.float32))
    r_p = torch.zeros_like(p) if decay == 0 else p.clone()  # "special ?optimization? for lamb stage 1"
    scaled_grad = g / clipped_global_grad_norm
    if mode == MOMENT_MODE_0:
        scaled_grad = scaled_grad + decay * r_p  # L2 on scaled grad
        m.copy_(m * beta1 + beta3 * scaled_grad)
        v.copy_(v * beta2 + (1 - beta2) * scaled_grad * scaled_grad)
        denom = torch.sqrt(v / beta2_correction) + epsilon
        g.copy_((m / beta1_correction) / denom)
    else:
        m.copy_(m * beta1 + beta3 * scaled_grad)
        v.copy_(v * beta2 + (1 - beta2) * scaled_grad * scaled_grad)
        denom = torch.sqrt(v / beta2_correction) + epsilon
        g.copy_((m / beta1_correction) / denom + decay * r_p)


def _lamb_stage2(update, p, param_norm, update_norm, learning_rate, decay, use_nvlamb) -> None:
    """LAMBStage2Functor: p <- p - ratio * update, the ratio lr * ||p|| / ||update|| (apex folds lr into it)."""
    ratio = learning_rate
    if use_nvlamb or decay != 0.0:  # nvlamb: every tensor; otherwise only those with non-zero weight decay
        ratio = learning_rate * (param_norm / update_norm) if update_norm != 0 and param_norm != 0 else learning_rate
    p.copy_(p - ratio * update)


def multi_tensor_lamb(tensor_lists, lr, beta1, beta2, epsilon, step, bias_correction, weight_decay, grad_averaging,
                      mode, global_grad_norm, max_grad_norm, use_nvlamb) -> None:
    """multi_tensor_lamb_cuda for tensor_lists = [grads, params, exp_avgs, exp_avg_sqs]."""
    lr, beta1, beta2, epsilon, weight_decay, max_grad_norm = map(
        _f32, (lr, beta1, beta2, epsilon, weight_decay, max_grad_norm))
    bias_correction1 = bias_correction2 = 1.0
    if bias_correction == 1:
        bias_correction1 = _f32(1 - math.pow(beta1, step))
        bias_correction2 = _f32(1 - math.pow(beta2, step))
    beta3 = _f32(1 - beta1) if grad_averaging == 1 else 1.0
    grads, params, exp_avgs, exp_avg_sqs = tensor_lists
    param_norms = [torch.linalg.vector_norm(p) for p in params]  # before stage 1, as the kernel orders it
    for g, p, m, v in zip(grads, params, exp_avgs, exp_avg_sqs):
        _lamb_stage1(g, p, m, v, beta1, beta2, beta3, bias_correction1, bias_correction2, epsilon, mode,
                     weight_decay, global_grad_norm, max_grad_norm)
    update_norms = [torch.linalg.vector_norm(g) for g in grads]  # the gradients now hold the updates
    for g, p, param_norm, update_norm in zip(grads, params, param_norms, update_norms):
        _lamb_stage2(g, p, param_norm, update_norm, lr, weight_decay, use_nvlamb)


class FusedLAMB(torch.optim.Optimizer):
    """apex.optimizers.FusedLAMB's interface and defaults; ``step`` as its fp32 path runs it."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 amsgrad=False, adam_w_mode=True, grad_averaging=True, set_grad_none=True, max_grad_norm=1.0,
                 use_nvlamb=False):
        if amsgrad:
            raise RuntimeError("FusedLAMB does not support the AMSGrad variant.")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay,
                        grad_averaging=grad_averaging, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)
        self.adam_w_mode = 1 if adam_w_mode else 0
        self.set_grad_none = set_grad_none
        self.use_nvlamb = use_nvlamb

    def zero_grad(self, set_to_none: bool = True):
        if self.set_grad_none:
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad = None
        else:
            super().zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        g_all_32 = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if any(g.dtype != torch.float32 for g in g_all_32):
            raise RuntimeError("this transcription keeps apex's fp32 path only")
        g_norm_32 = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in g_all_32]))
        g_norm_16 = torch.zeros((), dtype=torch.float32)
        global_grad_norm = torch.linalg.vector_norm(torch.stack([g_norm_32, g_norm_16]))  # blend the two norms
        max_grad_norm = self.defaults["max_grad_norm"]
        for group in self.param_groups:
            bias_correction = 1 if group["bias_correction"] else 0
            beta1, beta2 = group["betas"]
            grad_averaging = 1 if group["grad_averaging"] else 0
            group["step"] = group.get("step", 0) + 1  # one counter per group, not per parameter
            g_32, p_32, m_32, v_32 = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                g_32.append(p.grad)
                p_32.append(p.data)
                m_32.append(state["exp_avg"])
                v_32.append(state["exp_avg_sq"])
            if g_32:
                multi_tensor_lamb([g_32, p_32, m_32, v_32], group["lr"], beta1, beta2, group["eps"], group["step"],
                                  bias_correction, group["weight_decay"], grad_averaging, self.adam_w_mode,
                                  global_grad_norm, max_grad_norm, self.use_nvlamb)
        return loss
