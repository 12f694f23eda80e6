"""Resuming on 2 ranks: each rank gets its own RNG state back, and a run's checkpoints resume only on the world size
that wrote them (2 ranks -> 1 and 1 -> 2 refused in one line, before anything is loaded, also under ZeRO 2)."""

import json
from pathlib import Path

import pytest
from test_multirank import launch

WORKER = Path(__file__).with_name("rng_ranks.py")


@pytest.mark.slow
def test_every_rank_resumes_with_its_own_generators(tmp_path):
    out = tmp_path / "draws.json"
    codes, log = launch([str(out), str(tmp_path / "checkpoints")], timeout=300, program=(str(WORKER),))
    assert codes == [0, 0], log[-3000:]
    by_rank = json.loads(out.read_text())
    assert by_rank[0]["expected"] != by_rank[1]["expected"]  # the ranks' generators differ
    for rank, draws in enumerate(by_rank):
        assert draws["got"] == draws["expected"], f"rank {rank} did not get its own RNG state back"
