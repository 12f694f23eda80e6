"""Shared test set-up: DeepSpeed on CPU in one process without a launcher, deterministic torch."""

import os
import socket

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def single_process_dist():
    """The environment one DeepSpeed process needs without a launcher (else it looks for mpi4py)."""
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(_free_port()))):
        os.environ.setdefault(key, value)
    import deepspeed

    # The CPU accelerator JIT-compiles this op (~60 s) for inference all-reduce only; training never needs it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    yield


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """The test order's seed, also under -q (pytest-randomly prints it only in the header): a failure that depends on
    the order is reproduced with the same seed."""
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int) and config.pluginmanager.hasplugin("randomly"):
        terminalreporter.write_line(f"test order: random; reproduce it with --randomly-seed={seed}")
