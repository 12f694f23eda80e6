"""The background input pipeline: workers build exactly the in-process batches, in order, from any start."""

from __future__ import annotations

import itertools

import pytest
import torch

from earlybert_pretrain.pretrain.batches import PretrainingBatches, ShardedCorpus, prefetched

pytest_plugins = ["data_fixtures"]  # the session-wide build of the real dump


@pytest.fixture(scope="module")
def corpus(wiki_build) -> ShardedCorpus:
    return ShardedCorpus(wiki_build.shards)


def stream(corpus: ShardedCorpus, start_sample: int = 0, rank: int = 1) -> PretrainingBatches:
    return PretrainingBatches(corpus, 64, 10, micro_batch_size=3, rank=rank, world_size=2, seed=4,
                              start_sample=start_sample)


def test_workers_build_exactly_the_in_process_batches_in_order(corpus: ShardedCorpus) -> None:
    start = 2 * 3 * 7  # a resumed stream: the 8th micro-batch on
    expected = list(itertools.islice(prefetched(stream(corpus, start), 0, 2), 9))
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    got = list(itertools.islice(prefetched(stream(corpus, start), 2, 3), 9))
    assert torch.equal(torch.random.get_rng_state(), before)  # the loader leaves dropout's RNG alone
    assert len(got) == len(expected) == 9
    for want, have in zip(expected, got):
        assert want.keys() == have.keys()
        assert all(torch.equal(want[key], have[key]) for key in want)
