"""pretrain.batches: shards from the real dump -> NSP pairs, dynamic masking, determinism, ranks, resume."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep import indexed
from data_prep.indexed import check_vocab, vocab_digest
from earlybert_pretrain.common.files import sha256_file
from earlybert_pretrain.errors import DataError
from earlybert_pretrain.pretrain.batches import PretrainingBatches, ShardedCorpus

SEQ = 128
MAX_PRED = 20

pytest_plugins = ["data_fixtures"]  # the session-wide build of the real dump


@pytest.fixture(scope="module")
def corpus(wiki_build) -> ShardedCorpus:
    return ShardedCorpus(wiki_build.shards, verify="full")


@pytest.fixture(scope="module")
def samples(corpus: ShardedCorpus) -> dict[str, np.ndarray]:
    """3,000 consecutive examples of a single-rank stream, stacked."""
    batches = PretrainingBatches(corpus, SEQ, MAX_PRED, micro_batch_size=100, seed=7)
    stream = iter(batches)
    rows = [next(stream) for _ in range(30)]
    return {key: torch.cat([r[key] for r in rows]).numpy() for key in rows[0]}


def _copy_shards(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_corpus_maps_the_manifest(corpus: ShardedCorpus, wiki_build) -> None:
    manifest = json.loads((wiki_build.shards / "manifest.json").read_text())
    totals = manifest["totals"]["train"]
    assert (corpus.num_documents, corpus.num_sentences, corpus.num_tokens) == (
        totals["documents"], totals["sentences"], totals["tokens"])
    assert corpus.vocab_size == wiki_build.vocab_size and corpus.vocab_path == wiki_build.shards / "vocab.txt"
    assert all(isinstance(shard.tokens, np.memmap) for shard in corpus.shards)
    validation = ShardedCorpus(wiki_build.shards, split="validation")
    assert validation.num_documents == manifest["totals"]["validation"]["documents"]


def test_check_vocab(wiki_build, tmp_path: Path) -> None:
    recorded = vocab_digest(wiki_build.shards)
    assert recorded == sha256_file(wiki_build.shards / "vocab.txt")
    check_vocab(wiki_build.shards, wiki_build.vocab_size)
    check_vocab(wiki_build.shards, wiki_build.vocab_size, recorded)
    manifest = str(wiki_build.shards / "manifest.json")
    with pytest.raises(DataError, match=re.escape(manifest) + f".*{wiki_build.vocab_size}.*30522"):
        check_vocab(wiki_build.shards, 30522)
    other = tmp_path / "vocab.txt"
    other.write_text((wiki_build.shards / "vocab.txt").read_text().replace("the\n", "teh\n", 1))
    with pytest.raises(DataError, match=re.escape(manifest) + f".*{recorded}.*{other} expects {sha256_file(other)}"):
        check_vocab(wiki_build.shards, wiki_build.vocab_size, sha256_file(other), expected_by=str(other))


def test_batch_layout_matches_bert_for_pretraining(corpus: ShardedCorpus) -> None:
    batch = next(iter(PretrainingBatches(corpus, SEQ, MAX_PRED, micro_batch_size=8)))
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels", "next_sentence_label"}
    for key in ("input_ids", "token_type_ids", "attention_mask", "labels"):
        assert batch[key].shape == (8, SEQ) and batch[key].dtype == torch.int64
    assert batch["next_sentence_label"].shape == (8,) and batch["next_sentence_label"].dtype == torch.int64
    ids = corpus.special_ids
    for row in range(8):
        input_ids, types = batch["input_ids"][row], batch["token_type_ids"][row]
        length = int(batch["attention_mask"][row].sum())
        assert batch["attention_mask"][row, :length].all() and not batch["attention_mask"][row, length:].any()
        assert input_ids[0] == ids["[CLS]"] and (input_ids[length:] == ids["[PAD]"]).all()
        seps = (input_ids[:length] == ids["[SEP]"]).nonzero().flatten().tolist()
        assert len(seps) == 2 and seps[1] == length - 1 and seps[0] >= 2
        assert not types[: seps[0] + 1].any() and types[seps[0] + 1 : length].all() and not types[length:].any()
        labels = batch["labels"][row]
        assert (labels[[0, seps[0], seps[1]]] == -100).all() and (labels[length:] == -100).all()
        assert int(input_ids.max()) < corpus.vocab_size


def test_masking_rates(samples: dict[str, np.ndarray], corpus: ShardedCorpus) -> None:
    real_tokens = samples["attention_mask"].sum(axis=1) - 3
    masked = samples["labels"] != -100
    assert abs(masked.sum() / real_tokens.sum() - 0.15) < 0.01
    assert masked.sum(axis=1).max() <= MAX_PRED and masked.sum(axis=1).min() >= 1
    inputs, originals = samples["input_ids"][masked], samples["labels"][masked]
    as_mask = inputs == corpus.special_ids["[MASK]"]
    kept = inputs == originals
    replaced = ~as_mask & ~kept
    assert abs(as_mask.mean() - 0.8) < 0.02 and abs(kept.mean() - 0.1) < 0.02 and abs(replaced.mean() - 0.1) < 0.02
    assert (originals < corpus.vocab_size).all() and (originals > 4).all()  # never [PAD]/[CLS]/[SEP]/[MASK]
    # Unmasked positions keep their token: [MASK] appears nowhere else.
    assert not (samples["input_ids"][~masked] == corpus.special_ids["[MASK]"]).any()


def test_nsp_is_balanced_and_lengths_follow_short_seq_prob(samples: dict[str, np.ndarray]) -> None:
    assert abs(samples["next_sentence_label"].mean() - 0.5) < 0.03
    lengths = samples["attention_mask"].sum(axis=1)
    full = (lengths >= SEQ - 8).mean()
    assert 0.6 < full < 0.95  # most reach max_seq_len; ~10% target a shorter random length
    assert lengths.min() >= 5


def _original_tokens(row: dict[str, np.ndarray], cls: int, sep: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.where(row["labels"] != -100, row["labels"], row["input_ids"])[: row["attention_mask"].sum()]
    seps = np.flatnonzero(ids == sep)
    return ids[1 : seps[0]], ids[seps[0] + 1 : seps[1]]


def test_segment_b_continues_a_only_when_label_is_0(corpus: ShardedCorpus) -> None:
    """A+B must be one contiguous run of a document (label 0) or not (label 1), checked on untruncated examples."""
    docs = [corpus.span(d, 0, int(corpus.doc_sentences[d])).astype(np.int32).tobytes()
            for d in range(corpus.num_documents)]
    batches = PretrainingBatches(corpus, 512, 80, micro_batch_size=1, seed=3, short_seq_prob=1.0)
    checked = {0: 0, 1: 0}
    for g in range(400):
        row = batches.example(g)
        if row["attention_mask"].sum() >= 500:
            continue  # possibly truncated: the pair is no longer a contiguous run
        a, b = _original_tokens(row, corpus.special_ids["[CLS]"], corpus.special_ids["[SEP]"])
        pair = np.concatenate([a, b]).astype(np.int32).tobytes()
        contiguous = any(pair in doc for doc in docs)
        assert contiguous == (row["next_sentence_label"] == 0), g
        assert any(a.astype(np.int32).tobytes() in doc for doc in docs)
        checked[int(row["next_sentence_label"])] += 1
    assert checked[0] > 50 and checked[1] > 50


def test_same_seed_and_index_give_the_identical_example(corpus: ShardedCorpus) -> None:
    first = PretrainingBatches(corpus, SEQ, MAX_PRED, micro_batch_size=4, seed=11)
    second = PretrainingBatches(corpus, SEQ, MAX_PRED, micro_batch_size=4, seed=11)
    other_seed = PretrainingBatches(corpus, SEQ, MAX_PRED, micro_batch_size=4, seed=12)
    n = first.samples_per_epoch
    for g in (0, 17, n - 1, n, 3 * n + 5):  # across epochs too
        a, b = first.example(g), second.example(g)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(first.example(17)["input_ids"], other_seed.example(17)["input_ids"])
    # Epochs reshuffle: the same position in two epochs holds different examples.
    assert not np.array_equal(first.example(5)["input_ids"], first.example(n + 5)["input_ids"])


def test_an_epoch_visits_every_chunk_once(corpus: ShardedCorpus) -> None:
    batches = PretrainingBatches(corpus, SEQ, MAX_PRED, micro_batch_size=4, seed=5)
    n = batches.samples_per_epoch
    assert corpus.num_tokens / n > 100  # ~one chunk per max_seq_len tokens
    seen = {tuple(batches._chunk_at(0, i)) for i in range(n)}
    assert len(seen) == n == len({tuple(c) for c in batches.plan})


def test_resume_mid_epoch_and_across_epochs_continues_exactly(corpus: ShardedCorpus) -> None:
    micro, world = 6, 2
    n = PretrainingBatches(corpus, SEQ, MAX_PRED, micro, seed=9).samples_per_epoch
    start = (n // (micro * world) - 2) * micro * world  # two micro-batches before the epoch ends
    stream = PretrainingBatches(corpus, SEQ, MAX_PRED, micro, rank=1, world_size=world, seed=9, start_sample=start)
    iterator = iter(stream)
    reference = [next(iterator) for _ in range(6)]
    assert stream.samples_consumed == start + 6 * micro * world
    replay = PretrainingBatches(corpus, SEQ, MAX_PRED, micro, rank=1, world_size=world, seed=9, start_sample=start)
    replay_iter = iter(replay)
    for _ in range(3):
        next(replay_iter)
    state = replay.state_dict()
    assert state["samples_consumed"] == start + 3 * micro * world and state["seed"] == 9
    resumed = PretrainingBatches(corpus, SEQ, MAX_PRED, micro, rank=1, world_size=world, seed=state["seed"],
                                 start_sample=state["samples_consumed"])
    resumed_iter = iter(resumed)
    for expected in reference[3:]:
        got = next(resumed_iter)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match="multiple of world_size"):
        PretrainingBatches(corpus, SEQ, MAX_PRED, micro, rank=0, world_size=2, start_sample=3)


def test_two_ranks_split_the_single_rank_stream(corpus: ShardedCorpus) -> None:
    micro, steps = 5, 4
    single = PretrainingBatches(corpus, SEQ, MAX_PRED, micro * 2, seed=21)
    ranks = [PretrainingBatches(corpus, SEQ, MAX_PRED, micro, rank=r, world_size=2, seed=21) for r in (0, 1)]
    indices = [set(), set()]
    for step in range(steps):
        first = step * micro * 2
        for r, batches in enumerate(ranks):
            indices[r].update(batches.batch_indices(first))
        assert sorted(ranks[0].batch_indices(first) + ranks[1].batch_indices(first)) == single.batch_indices(first)
    assert not indices[0] & indices[1]
    assert indices[0] | indices[1] == set(range(steps * micro * 2))
    rank_batches = [iter(b) for b in ranks]
    whole = iter(single)
    for _ in range(steps):
        full = next(whole)["input_ids"]
        parts = [next(it)["input_ids"] for it in rank_batches]
        assert torch.equal(parts[0], full[0::2]) and torch.equal(parts[1], full[1::2])
        assert not any(torch.equal(x, y) for x in parts[0] for y in parts[1])
    assert ranks[0].samples_consumed == ranks[1].samples_consumed == single.samples_consumed == steps * micro * 2


def test_an_optimizer_step_trains_on_the_same_samples_on_any_world_size(corpus: ShardedCorpus) -> None:
    """What --allow-world-size-change relies on: step s of a global batch G reads samples [s*G, (s+1)*G), each
    once, however many ranks share them (the recipe starts a stage's stream at steps done x G)."""
    micro, global_batch = 3, 12
    for world in (1, 2, 4):
        accumulation = global_batch // (micro * world)
        ranks = [PretrainingBatches(corpus, SEQ, MAX_PRED, micro, rank=r, world_size=world, seed=5)
                 for r in range(world)]
        for step in (0, 7):
            read = [g for stream in ranks for k in range(accumulation)
                    for g in stream.batch_indices(step * global_batch + k * micro * world)]
            assert sorted(read) == list(range(step * global_batch, (step + 1) * global_batch)), world


def test_whole_word_masking_masks_whole_words(corpus: ShardedCorpus) -> None:
    batches = PretrainingBatches(corpus, SEQ, MAX_PRED, micro_batch_size=1, seed=4, whole_word_masking=True)
    continuation = np.array([t.startswith("##") for t in corpus.vocab])
    boundaries = (corpus.special_ids["[CLS]"], corpus.special_ids["[SEP]"])
    masked_total = real_total = 0
    for g in range(400):
        row = batches.example(g)
        labels = row["labels"]
        originals = np.where(labels != -100, labels, row["input_ids"])
        masked = labels != -100
        for pos in np.flatnonzero(masked):
            if continuation[originals[pos]] and originals[pos - 1] not in boundaries:
                # A masked "##" piece has its word's previous piece masked (a segment cut by truncation may
                # start mid-word, right after [CLS]/[SEP]).
                assert masked[pos - 1], (g, pos)
            if pos + 1 < len(originals) and continuation[originals[pos + 1]]:
                assert masked[pos + 1], (g, pos)
        masked_total += masked.sum()
        real_total += row["attention_mask"].sum() - 3
    assert 0.13 < masked_total / real_total < 0.16


def test_max_predictions_caps_the_masks(corpus: ShardedCorpus) -> None:
    batch = next(iter(PretrainingBatches(corpus, SEQ, max_predictions=5, micro_batch_size=32)))
    assert ((batch["labels"] != -100).sum(dim=1) == 5).all()


def test_corrupt_shards_are_named(wiki_build, tmp_path: Path) -> None:
    shards = _copy_shards(wiki_build.shards, tmp_path / "shards")
    target = shards / "train_00001.bin"
    data = bytearray(target.read_bytes())
    data[100], data[101] = data[101], (data[101] + 1) % 256
    target.write_bytes(bytes(data))
    ShardedCorpus(shards, verify="sizes")  # same size: the size check passes...
    with pytest.raises(DataError, match=re.escape(str(target)) + ".*sha256"):
        ShardedCorpus(shards, verify="full")  # ...the sha256 does not
    with pytest.raises(DataError, match=re.escape(str(target)) + ".*block digest"):
        ShardedCorpus(shards)  # nor the default sampled-block check (these shards are one block each)
    target.write_bytes(bytes(data[:-2]))
    with pytest.raises(DataError, match=re.escape(str(target)) + ".*bytes"):
        ShardedCorpus(shards, verify="sizes")


def test_token_ids_beyond_the_vocab_are_named(wiki_build, tmp_path: Path) -> None:
    shards = _copy_shards(wiki_build.shards, tmp_path / "shards")
    target = shards / "train_00000.bin"
    tokens = np.fromfile(target, dtype="<u2")
    tokens[:50] = wiki_build.vocab_size + 7
    tokens.tofile(target)
    manifest_path = shards / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = manifest["splits"]["train"][0]
    entry.update(indexed.describe_shard(target, shards / entry["idx"]))  # a manifest that tells the truth
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=re.escape(str(target)) + f".*{wiki_build.vocab_size + 7} >= vocab"):
        ShardedCorpus(shards, verify="full")
    entry["max_token_id"] = 0  # a manifest that lies: the first read of those tokens fails, naming the shard
    manifest_path.write_text(json.dumps(manifest))
    corpus = ShardedCorpus(shards)
    with pytest.raises(DataError, match=re.escape(str(target))):
        corpus.span(0, 0, 2)


def test_missing_or_foreign_manifest(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "manifest.json"))):
        ShardedCorpus(tmp_path)
    (tmp_path / "manifest.json").write_text('{"stage": "extract"}')
    with pytest.raises(DataError, match="not an earlybert-shards-v2 manifest"):
        ShardedCorpus(tmp_path)


def test_sampled_block_check_reads_only_the_sampled_blocks(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(indexed, "BLOCK_BYTES", 64)
    bin_path, idx_path = tmp_path / "s.bin", tmp_path / "s.idx"
    np.arange(400, dtype="<u2").tofile(bin_path)  # 800 bytes: 12 full blocks and a partial one
    indexed.write_index(idx_path, np.dtype("<u2"), np.array([100] * 4), np.array([0, 2, 4]))
    entry = indexed.describe_shard(bin_path, idx_path)
    data = bin_path.read_bytes()
    assert entry["bin_blocks"] == [hashlib.blake2b(data[i:i + 64], digest_size=8).hexdigest()
                                   for i in range(0, 800, 64)]
    assert entry["bin_sha256"] == hashlib.sha256(data).hexdigest() and entry["max_token_id"] == 399
    flipped = bytearray(data)
    flipped[5 * 64 + 3] ^= 0xFF  # block 5
    bin_path.write_bytes(bytes(flipped))
    monkeypatch.setattr(indexed.random, "sample", lambda population, k: [5, 3][:k])
    with pytest.raises(DataError, match=re.escape(str(bin_path)) + ": bytes 320..384 disagree"):
        indexed.verify_shard(tmp_path, entry, "sample")
    with pytest.raises(DataError, match=re.escape(str(bin_path)) + ": sha256 disagrees"):
        indexed.verify_shard(tmp_path, entry, "full")
    monkeypatch.setattr(indexed.random, "sample", lambda population, k: [0, 1][:k])
    indexed.verify_shard(tmp_path, entry, "sample")  # a sample misses what it does not read; `full` is the remedy
    indexed.verify_shard(tmp_path, entry, "sizes")
    with pytest.raises(DataError, match="data.verify: expected one of sample, full, sizes"):
        indexed.verify_shard(tmp_path, entry, "bogus")


def test_shards_re_prepared_with_another_vocab_of_the_same_size_are_refused(wiki_build, tmp_path: Path) -> None:
    from data_prep.shard import shard_corpus
    from data_prep.vocab import build_vocab

    recorded = vocab_digest(wiki_build.shards)  # what a run records when it starts
    tokens = (wiki_build.vocab / "vocab.txt").read_text(encoding="utf-8").splitlines()
    tokens[-1], tokens[-2] = tokens[-2], tokens[-1]  # same tokens, same size, two ids exchanged
    swapped = tmp_path / "swapped.txt"
    swapped.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    build_vocab(None, tmp_path / "vocab", existing=swapped)
    shards = tmp_path / "shards"
    shard_corpus(wiki_build.sentences, tmp_path / "vocab", shards, num_shards=2, validation_fraction=0.05)
    assert ShardedCorpus(shards).vocab_size == wiki_build.vocab_size
    check_vocab(shards, wiki_build.vocab_size)  # the size alone cannot tell
    with pytest.raises(DataError) as refused:
        check_vocab(shards, wiki_build.vocab_size, recorded, expected_by="the run in out/")
    message = str(refused.value)
    assert "\n" not in message and str(shards / "manifest.json") in message
    assert sha256_file(swapped) in message and recorded in message and "the run in out/ expects" in message
