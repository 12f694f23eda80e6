"""The chunk-level sample plan equals the sentence-by-sentence loop it replaced, on the real sample and on edges;
its cache (built once, memory-mapped, rebuilt when stale) gives the same plan."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import pickle
import random
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from earlybert_pretrain.errors import DataError
from earlybert_pretrain.pretrain import sample_plan
from earlybert_pretrain.pretrain.batches import PretrainingBatches, ShardedCorpus
from earlybert_pretrain.pretrain.layout import RunLayout
from earlybert_pretrain.pretrain.sample_plan import build_sample_plan, cached_sample_plan, plan_paths

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
    assert got.dtype == np.int32 and got.shape == expected.shape and len(got) > 100
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


def test_a_corpus_that_overflows_int32_is_named() -> None:
    huge = SimpleNamespace(num_documents=2**31, doc_sentences=np.array([3]), manifest_path=Path("m/manifest.json"),
                           split="train")
    with pytest.raises(DataError, match=r"m/manifest.json: split 'train' has 2,147,483,648 documents.*int32"):
        sample_plan.check_fits_int32(huge, 128)


SETTING = (64, 0.1, 4)


@pytest.fixture(scope="module")
def corpus(wiki_build) -> ShardedCorpus:
    return ShardedCorpus(wiki_build.shards)


@pytest.fixture
def builds(monkeypatch) -> list[int]:
    """Counts the cache's calls of the builder."""
    calls: list[int] = []
    real = sample_plan.build_sample_plan

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(sample_plan, "build_sample_plan", counted)
    return calls


def test_the_cache_is_built_once_then_memory_mapped(corpus, tmp_path, builds, caplog) -> None:
    fresh = build_sample_plan(corpus, *SETTING)
    with caplog.at_level("INFO", logger="earlybert_pretrain.pretrain.sample_plan"):
        first = cached_sample_plan(corpus, *SETTING, tmp_path)
    npy, sidecar = plan_paths(tmp_path, *SETTING)
    logged = rf"sample plan: building seq 64 .*: {len(fresh):,} chunks .* in [0-9.]+ s -> {re.escape(str(npy))}"
    assert re.search(logged, caplog.text)
    assert isinstance(first, np.memmap) and first.dtype == np.int32 and np.array_equal(first, fresh)
    meta = json.loads(sidecar.read_text())
    assert meta["shape"] == list(fresh.shape) and meta["split"] == "train"
    assert npy.name == "plan-seq64-short0.1-seed4.npy" and sidecar.name == "plan-seq64-short0.1-seed4.json"
    assert meta["manifest_sha256"] == hashlib.sha256(corpus.manifest_path.read_bytes()).hexdigest()
    stamp = npy.stat().st_mtime_ns
    second = cached_sample_plan(corpus, *SETTING, tmp_path)
    assert isinstance(second, np.memmap) and np.array_equal(second, fresh)
    assert len(builds) == 1 and npy.stat().st_mtime_ns == stamp
    layout = RunLayout(tmp_path)
    # under checkpoints/, the folder every rank is checked to share (--overwrite removes it with them)
    assert layout.plans == tmp_path / "checkpoints" / "plans" and "checkpoints" in layout.owned()


def _damage(npy: Path, sidecar: Path, how: str) -> None:
    if how == "other manifest":
        meta = json.loads(sidecar.read_text())
        sidecar.write_text(json.dumps({**meta, "manifest_sha256": "0" * 64}))
    elif how == "truncated":
        npy.write_bytes(npy.read_bytes()[:-16])
    elif how == "wrong shape":
        meta = json.loads(sidecar.read_text())
        sidecar.write_text(json.dumps({**meta, "shape": [meta["shape"][0] - 1, 4]}))
    elif how == "int64":
        np.save(npy, np.load(npy).astype(np.int64))
    elif how == "no sidecar":
        sidecar.unlink()
    elif how == "garbage":
        npy.write_bytes(b"not a plan")


@pytest.mark.parametrize("how", ["other manifest", "truncated", "wrong shape", "int64", "no sidecar", "garbage"])
def test_a_stale_or_damaged_cache_is_rebuilt(corpus, tmp_path, builds, how) -> None:
    cached_sample_plan(corpus, *SETTING, tmp_path)
    _damage(*plan_paths(tmp_path, *SETTING), how)
    rebuilt = cached_sample_plan(corpus, *SETTING, tmp_path)
    assert len(builds) == 2 and isinstance(rebuilt, np.memmap)
    assert np.array_equal(rebuilt, build_sample_plan(corpus, *SETTING))
    assert len(builds) == 2 and np.array_equal(cached_sample_plan(corpus, *SETTING, tmp_path), rebuilt)


def _digest_of_cached(corpus, folder, queue) -> None:
    plan = cached_sample_plan(corpus, *SETTING, folder)
    queue.put((type(plan).__name__, hashlib.sha256(np.ascontiguousarray(plan).tobytes()).hexdigest()))


def test_two_processes_reading_the_cache_get_equal_plans(corpus, tmp_path) -> None:
    """Both race to build an empty cache (atomic writes), then both map the one that is there."""
    expected = hashlib.sha256(build_sample_plan(corpus, *SETTING).tobytes()).hexdigest()
    context = multiprocessing.get_context("fork")
    for _ in range(2):
        queue = context.Queue()
        workers = [context.Process(target=_digest_of_cached, args=(corpus, tmp_path, queue)) for _ in range(2)]
        for worker in workers:
            worker.start()
        got = [queue.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join(timeout=60)
            assert worker.exitcode == 0
        assert got == [("memmap", expected)] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan-seq64-short0.1-seed4.json",
                                                          "plan-seq64-short0.1-seed4.npy"]


def test_a_pickled_stream_maps_its_plan_again_by_path(corpus, tmp_path) -> None:
    stream = PretrainingBatches(corpus, SETTING[0], 10, micro_batch_size=3, seed=SETTING[2],
                                short_seq_prob=SETTING[1], plan_cache=tmp_path)
    assert isinstance(stream.plan, np.memmap)
    assert stream.__getstate__()["plan"] == Path(stream.plan.filename)  # the plan travels as its path
    copy = pickle.loads(pickle.dumps(stream))
    assert copy.corpus._plans == {}  # nor does the corpus' copy of it
    assert isinstance(copy.plan, np.memmap) and Path(copy.plan.filename) == Path(stream.plan.filename)
    assert np.array_equal(copy.plan, stream.plan)
    for key, value in copy.example(17).items():
        assert np.array_equal(value, stream.example(17)[key])


def test_a_killed_builds_temp_file_is_swept_and_a_live_ones_kept(corpus, tmp_path) -> None:
    npy, _ = plan_paths(tmp_path, *SETTING)
    dead = tmp_path / f".tmp-999999999-0a1b2c3d-{npy.name}"  # above any pid_max: no such process
    live = tmp_path / f".tmp-{multiprocessing.current_process().pid}-0a1b2c3d-{npy.name}"
    for temp in (dead, live):
        temp.write_bytes(b"half a plan")
    cached_sample_plan(corpus, *SETTING, tmp_path)
    assert not dead.exists() and live.exists()


def test_bytes_flipped_inside_a_cached_plan_are_caught_by_its_sha256_and_the_plan_rebuilt(corpus, tmp_path, builds,
                                                                                         caplog) -> None:
    """A killed run's plan whose bytes changed in place (header and size intact) is not used on --resume."""
    expected = build_sample_plan(corpus, *SETTING)
    cached_sample_plan(corpus, *SETTING, tmp_path)
    npy, sidecar = plan_paths(tmp_path, *SETTING)
    size = npy.stat().st_size
    with open(npy, "r+b") as handle:  # a document index in the middle of the data: a plausible, wrong plan
        handle.seek(size // 2 - size // 2 % 16)
        handle.write(np.int32(7).tobytes())
    assert npy.stat().st_size == size and not np.array_equal(np.load(npy), expected)
    with caplog.at_level("WARNING", logger="earlybert_pretrain.pretrain.sample_plan"):
        rebuilt = cached_sample_plan(corpus, *SETTING, tmp_path)
    assert len(builds) == 2 and np.array_equal(rebuilt, expected) and np.array_equal(np.load(npy), expected)
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert warnings == [f"sample plan {npy}: its bytes do not match the sha256 in {sidecar.name} (changed after it "
                        "was built); rebuilding it"]
    assert json.loads(sidecar.read_text())["sha256"] == hashlib.sha256(npy.read_bytes()).hexdigest()
