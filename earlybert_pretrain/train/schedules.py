"""Learning-rate schedules: NVIDIA's poly warmup for pre-training (Sec. 4.1), linear warmup / decay for fine-tuning."""

from __future__ import annotations

import functools

import torch

from earlybert_pretrain.errors import ConfigError


def _check_schedule(total_steps: int, warmup_fraction: float) -> None:
    if total_steps < 1:
        raise ConfigError(f"schedule: total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ConfigError(f"schedule: warmup fraction must be in [0, 1), got {warmup_fraction}")


def warmup_poly_lr(step: int, base_lr: float, total_steps: int, warmup_fraction: float, power: float = 0.5) -> float:
    """NVIDIA's PolyWarmUpScheduler (DeepLearningExamples BERT), exactly: with progress = step / total_steps,

        progress <  warmup_fraction:  base_lr * progress / warmup_fraction         (linear from 0)
        progress >= warmup_fraction:  base_lr * (1 - progress) ** power            (0 at step == total_steps)

    Note NVIDIA's jump at the end of warmup, from base_lr to base_lr * (1 - warmup_fraction) ** power; kept as is.
    ``build_scheduler`` applies it with NVIDIA's step numbering (the n-th optimizer step, n >= 1, uses step n).
    """
    _check_schedule(total_steps, warmup_fraction)
    progress = min(step / total_steps, 1.0)
    if progress < warmup_fraction:
        return base_lr * progress / warmup_fraction
    return base_lr * (1.0 - progress) ** power


def linear_warmup_decay(step: int, base_lr: float, total_steps: int, warmup_fraction: float) -> float:
    """Linear warmup from 0 over warmup_fraction * total_steps steps, then linear decay to 0 at total_steps
    (transformers' get_linear_schedule_with_warmup, used for fine-tuning)."""
    _check_schedule(total_steps, warmup_fraction)
    warmup_steps = warmup_fraction * total_steps
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    return base_lr * max(0.0, (total_steps - step) / (total_steps - warmup_steps))


SCHEDULES = {"warmup_poly": warmup_poly_lr, "warmup_linear": linear_warmup_decay}


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float, power: float = 0.5,
                    schedule: str = "warmup_poly") -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR scaling every group's lr; the n-th optimizer step (n = 1..total_steps) runs at schedule(n).

    NVIDIA steps its scheduler before each optimizer step, so its first step already has a non-zero lr and its last
    one lr 0; LambdaLR evaluates at 0 before the first step, hence the ``+ 1``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
    _check_schedule(total_steps, warmup_fraction)
    shape = functools.partial(warmup_poly_lr, power=power) if schedule == "warmup_poly" else linear_warmup_decay

    def factor(index: int) -> float:
        return shape(index + 1, 1.0, total_steps, warmup_fraction)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
