"""One rank of the per-rank RNG check (launched by tests/test_resume_ranks.py with RANK / WORLD_SIZE / MASTER_*).

``rng_ranks.py OUT CKPT``: each rank seeds its generators differently (as its dropout and data streams differ), saves
a checkpoint with ``capture_rng_state()``, draws from Python, NumPy and torch, then reseeds every rank alike, loads the
checkpoint into a new engine, restores and draws again; rank 0 writes every rank's two draws to OUT (JSON).
"""

import json
import random
import sys

import numpy as np
import torch
from test_engine import tiny_model

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


def engine():
    model = tiny_model(dropout=0.1)
    optimizer, _ = build_optimizer(model, OptimizerConfig(), 1e-2)
    return build_engine(model, optimizer, None, deepspeed_config(8, 2, 2, "fp32", 1.0, 0, "lamb"))


def seed(value: int) -> None:
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def draws() -> list:
    return [random.random(), float(np.random.rand()), torch.rand(3).tolist()]


def main(out: str, ckpt: str) -> None:
    rank, _, _ = init_distributed()
    first = engine()
    seed(100 + rank)
    save_checkpoint(first, ckpt, checkpoint_tag("phase1", 1), {"rng": capture_rng_state()}, keep=1)
    expected = draws()
    seed(0)  # every rank alike: only what the checkpoint holds for this rank can give its draws back
    restore_rng_state(load_latest_checkpoint(engine(), ckpt)["rng"])
    results = from_every_rank({"expected": expected, "got": draws()})
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(results, handle)


if __name__ == "__main__":
    main(*sys.argv[1:])
