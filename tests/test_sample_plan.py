"""The chunk-level sample plan equals the sentence-by-sentence loop it replaced, on the real sample and on edges."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from earlybert_pretrain.errors import DataError
from earlybert_pretrain.pretrain.batches import ShardedCorpus, build_sample_plan

pytest_plugins = ["data_fixtures"]  # the session-wide build of the real dump


def reference_plan(corpus, max_seq_len: int, short_seq_prob: float, seed: int) -> np.ndarray:
    """The plan as first written: one Python step per sentence (kept here as the definition)."""
    max_num_tokens = max_seq_len - 3
    draw = random.Random(seed)

    def target() -> int:
        return draw.randint(2, max_num_tokens) if draw.random() < short_seq_prob else max_num_tokens

    plan: list[tuple[int, int, int, int]] = []
    for doc in range(corpus.num_documents):
        lengths = corpus.sentence_lengths(doc).tolist()
        if len(lengths) < 2:
            continue
        begin, current, goal = 0, 0, target()
        for end, length in enumerate(lengths, 1):
            current += length
            if (current >= goal and end - begin >= 2) or end == len(lengths):
                if end - begin >= 2:
                    plan.append((doc, begin, end, goal))
                else:
                    last_doc, last_begin, _, last_goal = plan[-1]
                    plan[-1] = (last_doc, last_begin, end, last_goal)
                begin, current, goal = end, 0, target()
    return np.asarray(plan, dtype=np.int64)


def synthetic_corpus(documents: list[list[list[int]]]) -> SimpleNamespace:
    """A corpus of shards of documents of sentence lengths, with the attributes the plan reads."""
    shards, doc_shard, doc_first, doc_sentences = [], [], [], []
    for index, shard_docs in enumerate(documents):
        lengths = [length for doc in shard_docs for length in doc]
        shards.append(SimpleNamespace(num_sentences=len(lengths), sentence_lengths=np.array(lengths, np.int32)))
        first = 0
        for doc in shard_docs:
            doc_shard.append(index)
            doc_first.append(first)
            doc_sentences.append(len(doc))
            first += len(doc)
    corpus = SimpleNamespace(shards=shards, doc_shard=np.array(doc_shard), doc_first=np.array(doc_first),
                             doc_sentences=np.array(doc_sentences), num_documents=len(doc_shard),
                             manifest_path=Path("manifest.json"), split="train")
    corpus.sentence_lengths = lambda doc: shards[doc_shard[doc]].sentence_lengths[
        doc_first[doc] : doc_first[doc] + doc_sentences[doc]]
    return corpus


@pytest.mark.parametrize(("max_seq_len", "short_seq_prob", "seed"), [(128, 0.1, 12345), (512, 0.1, 7),
                                                                     (32, 0.5, 3), (64, 0.0, 1), (128, 1.0, 2)])
def test_plan_equals_the_sentence_loop_on_the_real_sample(wiki_build, max_seq_len, short_seq_prob, seed) -> None:
    corpus = ShardedCorpus(wiki_build.shards)
    expected = reference_plan(corpus, max_seq_len, short_seq_prob, seed)
    got = build_sample_plan(corpus, max_seq_len, short_seq_prob, seed)
    assert got.dtype == np.int64 and got.shape == expected.shape and len(got) > 100
    assert np.array_equal(got, expected)


def test_plan_equals_the_sentence_loop_on_edge_cases() -> None:
    rng = np.random.default_rng(0)
    shards = [[rng.integers(0, 40, size=rng.integers(1, 12)).tolist() for _ in range(200)] for _ in range(3)]
    shards[1][:4] = [[5], [0, 0], [200, 1], [1, 1, 1, 300]]  # one sentence, empty sentences, a long one, a lone tail
    corpus = synthetic_corpus(shards)
    for max_seq_len, short_seq_prob in ((8, 0.3), (16, 0.9), (40, 0.1)):
        assert np.array_equal(build_sample_plan(corpus, max_seq_len, short_seq_prob, 11),
                              reference_plan(corpus, max_seq_len, short_seq_prob, 11))


def test_a_corpus_without_two_sentence_documents_is_named() -> None:
    with pytest.raises(DataError, match="manifest.json: no document of split 'train' has two sentences"):
        build_sample_plan(synthetic_corpus([[[4], [9]]]), 128, 0.1, 1)
