"""Where the run executes: device, data-parallel ranks (torchrun / deepspeed launcher env), mixed precision.

One process: CPU or one GPU. Several (WORLD_SIZE > 1, set by torchrun or the deepspeed launcher): torch.distributed
(NCCL on GPU, gloo on CPU) and DistributedDataParallel, each rank a slice of every global batch. Autocast uses bf16 on
GPUs that support it and fp16 with a gradient scaler elsewhere; the CPU path runs in fp32.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None  # None: fp32
    scaler: torch.amp.GradScaler | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, precision: str = "auto") -> Runtime:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        amp_dtype = _amp_dtype(precision, device)
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        return cls(device, rank, world_size, amp_dtype, scaler)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP across ranks; the bare model in one process."""
        model.to(self.device)
        if not self.distributed:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def backward_and_step(self, loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer,
                          grad_clip: float) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise ValueError(f"precision: {precision} autocast is for GPUs; this run has no CUDA device (use fp32 or "
                             "auto)")
        return None
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
