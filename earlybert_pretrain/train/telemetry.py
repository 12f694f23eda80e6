"""Step timing as the paper's protocol (Sec. 4.1) and TensorBoard logging on rank 0.

The protocol: time every training step on its own, excluding data I/O (the batch is fetched before the timer
starts), CUDA-synchronised on GPU, and average over the whole run; EarlyBERT's time includes its search stage.
On CPU the protocol clock is the process's CPU seconds (``time.process_time``, all its threads): other jobs on a
shared machine stretch wall time, not the CPU time this process spends, and data-loader workers are other
processes, so their work stays out as the protocol wants. Wall-clock step time and the time spent waiting for a
batch are kept beside it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import torch


class StepTimer:
    """Accumulates per-step time; ``with timer.step(): ...`` wraps exactly one training step and
    ``with timer.data_wait(): ...`` each fetch of a batch, before the step or inside it.

    A wait inside a step pauses the step's clocks: micro-batches are fetched as the step needs them (the next ones
    are built while the current one computes), and the time the step waits for one is data I/O, not step time.
    On CUDA the host's wait is subtracted whole, also where queued device work overlapped it; when the input keeps
    up the waits are ~0 and there is nothing to subtract.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.synchronize = torch.cuda.is_available() and torch.device(device).type == "cuda"
        self.clock = "cuda_synchronized_wall" if self.synchronize else "process_cpu"
        self._now = time.perf_counter if self.synchronize else time.process_time
        self.total_seconds = self.wall_seconds = self.data_wait_seconds = 0.0
        self.steps = 0
        self.tokens = 0
        self.last_seconds = self.last_wall_seconds = self.last_data_wait_seconds = 0.0
        self._waited_wall = self._waited_clock = 0.0  # waits since the last step ended (before it and inside it)

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        if self.synchronize:
            torch.cuda.synchronize()
        start, wall_start = self._now(), time.perf_counter()
        waited_wall, waited_clock = self._waited_wall, self._waited_clock
        yield
        if self.synchronize:
            torch.cuda.synchronize()
        self.last_seconds = self._now() - start - (self._waited_clock - waited_clock)
        self.last_wall_seconds = time.perf_counter() - wall_start - (self._waited_wall - waited_wall)
        self.last_data_wait_seconds = self._waited_wall
        self._waited_wall = self._waited_clock = 0.0
        self.total_seconds += self.last_seconds
        self.wall_seconds += self.last_wall_seconds
        self.steps += 1

    def count_tokens(self, tokens: int) -> None:
        """Real tokens of the last step, added once it is done (a count from device tensors then costs no sync)."""
        self.tokens += tokens

    @contextlib.contextmanager
    def data_wait(self) -> Iterator[None]:
        """Wall time until a batch is in hand (and copied to the device): outside the protocol."""
        start, clock_start = time.perf_counter(), self._now()
        yield
        waited = time.perf_counter() - start
        self._waited_wall += waited
        self._waited_clock += self._now() - clock_start
        self.data_wait_seconds += waited

    @property
    def mean_step_seconds(self) -> float:
        return self.total_seconds / self.steps if self.steps else 0.0

    @property
    def data_wait_share(self) -> float:
        """The share of wall time (steps and waits) spent waiting for data."""
        spent = self.wall_seconds + self.data_wait_seconds
        return self.data_wait_seconds / spent if spent else 0.0

    def summary(self) -> dict:
        return {"steps": self.steps, "clock": self.clock, "total_seconds": self.total_seconds,
                "mean_step_seconds": self.mean_step_seconds, "tokens": self.tokens,
                "tokens_per_second": self.tokens / self.total_seconds if self.total_seconds else 0.0,
                "wall_seconds": self.wall_seconds, "data_wait_seconds": self.data_wait_seconds,
                "data_wait_share": self.data_wait_share,
                "wall_tokens_per_second": self.tokens / self.wall_seconds if self.wall_seconds else 0.0}

    def state_dict(self) -> dict:
        return {"total_seconds": self.total_seconds, "steps": self.steps, "tokens": self.tokens,
                "wall_seconds": self.wall_seconds, "data_wait_seconds": self.data_wait_seconds}

    def load_state_dict(self, state: dict) -> None:
        self.total_seconds, self.steps, self.tokens = state["total_seconds"], state["steps"], state["tokens"]
        # checkpoints written before wall and data-wait time were kept resume with those at zero
        self.wall_seconds = state.get("wall_seconds", 0.0)
        self.data_wait_seconds = state.get("data_wait_seconds", 0.0)


class TensorBoardLogger:
    """A SummaryWriter on rank 0 only; every call is a no-op elsewhere, so callers need not check the rank."""

    def __init__(self, log_dir: str | Path, enabled: bool = True):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        if self.writer is not None:
            for name, value in values.items():
                if value is not None:
                    self.writer.add_scalar(f"{prefix}{name}", float(value), step)

    def histogram(self, name: str, values: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_histogram(name, values.detach().float().cpu(), step)

    def image(self, name: str, image_hwc, step: int) -> None:
        """``image_hwc``: a uint8 array of shape [H, W, 3]."""
        if self.writer is not None:
            self.writer.add_image(name, image_hwc, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
