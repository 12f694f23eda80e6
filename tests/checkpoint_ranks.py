"""One rank of the 2-rank checkpoint checks (launched by tests/test_resume_ranks.py with RANK / WORLD_SIZE / MASTER_*).

``rng OUT CKPT``: each rank seeds its generators differently (as its dropout and data streams differ), saves a
checkpoint with ``capture_rng_state()``, draws from Python, NumPy and torch, then reseeds every rank alike, loads the
checkpoint into a new engine, restores and draws again; rank 0 writes every rank's two draws to OUT (JSON).
``full-disk OUT CKPT``: ZeRO 2 (each rank writes its own optimizer partition); a first checkpoint is saved, then rank
1 alone finds the disk full while writing the second; rank 0 writes what every rank raised, the tags left and the
step a new engine resumes from to OUT.
"""

import errno
import json
import os
import random
import sys

import numpy as np
import torch
from test_engine import tiny_model

from earlybert_pretrain.common.oserrors import FileSystemError
from earlybert_pretrain.config import OptimizerConfig
from earlybert_pretrain.train.checkpoint import (
    capture_rng_state,
    checkpoint_tag,
    load_latest_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from earlybert_pretrain.train.distributed import from_every_rank
from earlybert_pretrain.train.engine import build_engine, deepspeed_config, init_distributed
from earlybert_pretrain.train.optim import build_optimizer


def engine(zero_stage: int = 0):
    model = tiny_model(dropout=0.1)
    optimizer, _ = build_optimizer(model, OptimizerConfig(), 1e-2, zero_stage)
    return build_engine(model, optimizer, None, deepspeed_config(8, 2, 2, "fp32", 1.0, zero_stage, "lamb"))


def seed(value: int) -> None:
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def draws() -> list:
    return [random.random(), float(np.random.rand()), torch.rand(3).tolist()]


def rng(rank: int, ckpt: str) -> list:
    first = engine()
    seed(100 + rank)
    save_checkpoint(first, ckpt, checkpoint_tag("phase1", 1), {"rng": capture_rng_state()}, keep=1)
    expected = draws()
    seed(0)  # every rank alike: only what the checkpoint holds for this rank can give its draws back
    restore_rng_state(load_latest_checkpoint(engine(), ckpt)["rng"])
    return from_every_rank({"expected": expected, "got": draws()})


def full_disk(rank: int, ckpt: str) -> dict:
    saving = engine(zero_stage=2)
    save_checkpoint(saving, ckpt, checkpoint_tag("phase1", 1), {"step": 1}, keep=2)
    real_save = torch.save

    def disk_full(obj, handle, **options):
        handle.write(b"PK\x03\x04 half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    if rank == 1:
        torch.save = disk_full
    try:
        save_checkpoint(saving, ckpt, checkpoint_tag("phase1", 2), {"step": 2}, keep=2)
        raised = None
    except FileSystemError as err:
        raised = str(err)
    torch.save = real_save
    raised_by_rank = from_every_rank(raised)
    resumed = load_latest_checkpoint(engine(zero_stage=2), ckpt)
    tags = sorted(name for name in os.listdir(ckpt) if name.startswith("phase1-"))  # DeepSpeed adds zero_to_*.py
    return {"raised_by_rank": raised_by_rank, "tags": tags, "resumed_step": resumed["step"]}


def main(mode: str, out: str, ckpt: str) -> None:
    rank, _, _ = init_distributed()
    result = rng(rank, ckpt) if mode == "rng" else full_disk(rank, ckpt)
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(result, handle)


if __name__ == "__main__":
    main(*sys.argv[1:])
