"""The sample plan: every document cut into chunks of sentences (see ``batches``' module docstring), built once.

``build_sample_plan`` returns the plan as int32 ``[n, 4]`` rows ``[doc, first sentence, end sentence, target]``
(16 bytes a chunk; 0.45 GB at Wikipedia's ~28M chunks). ``cached_sample_plan`` builds it once into a cache folder
(pre-training: the run's ``checkpoints/plans/``, which every rank is checked to share) and memory-maps it, so the
ranks of a node share one copy in the page cache:

    plans/plan-seq128-short0.1-seed12345.npy    the plan (``np.save`` format, written to a temp file + os.replace)
    plans/plan-seq128-short0.1-seed12345.json   its sidecar: key, split, sha256 of the shards' manifest.json, shape,
                                                sha256 of the .npy

Global rank 0 builds (the run folder is on a disk every rank sees, ``train.checkpoint.check_shared``); the other
ranks wait for it and map the file. A cache is used only when its sidecar names this corpus (manifest sha256 and
split) and key, its ``.npy`` header and size agree with the sidecar's shape and int32, and its bytes have the
sidecar's sha256 (hashed by rank 0 once per process and plan: 122 MB/s measured on a loaded 2-core machine, ~4 s for
Wikipedia's 0.45 GB); anything else (another corpus, a truncated, changed or foreign file, a missing sidecar) is
rebuilt, never trusted.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from array import array
from bisect import bisect_left
from pathlib import Path
from typing import Any

import numpy as np

from earlybert_pretrain.common.files import TEMP_MARK, atomic_path, atomic_write_json, sha256_file
from earlybert_pretrain.errors import DataError
from earlybert_pretrain.train.distributed import from_every_rank, on_main_rank

logger = logging.getLogger(__name__)

PLAN_DTYPE = np.int32
PLAN_LIMIT = 2**31 - 1
CACHE_FORMAT = 2  # 2: the sidecar holds the .npy's sha256


def check_fits_int32(corpus: Any, max_seq_len: int) -> None:
    """The plan's values (document index, sentence index within a document, target) must fit int32."""
    most_sentences = int(corpus.doc_sentences.max()) if len(corpus.doc_sentences) else 0
    for what, value in (("documents", corpus.num_documents), ("sentences in one document", most_sentences),
                        ("max_seq_len", max_seq_len)):
        if value > PLAN_LIMIT:
            raise DataError(f"{corpus.manifest_path}: split '{corpus.split}' has {value:,} {what}; the sample plan "
                            f"stores int32 (at most {PLAN_LIMIT:,}): split the corpus or its documents")


def build_sample_plan(corpus: Any, max_seq_len: int, short_seq_prob: float, seed: int) -> np.ndarray:
    """Chunks ``[doc, first sentence, end sentence, target length]`` (int32 [n, 4]) — see ``batches``' docstring.

    One Python step per chunk, none per sentence: a chunk from ``begin`` with goal ``g`` ends at the first
    ``end >= begin + 2`` whose running token count ``cum[end] - cum[begin]`` reaches ``g`` (a C bisect over the
    shard's cumulative lengths), else at the document's end. The goals come from ``random.Random(seed)`` in the
    order the plan has always drawn them — one when a document starts, one after every closed chunk, one for a lone
    last sentence — so the plan is the one the sentence-by-sentence loop built (tests/test_sample_plan.py keeps
    that loop as the reference). ``corpus`` is a ``batches.ShardedCorpus`` or anything with its attributes.
    """
    check_fits_int32(corpus, max_seq_len)
    max_num_tokens = max_seq_len - 3
    draw = random.Random(seed)

    def target() -> int:
        return draw.randint(2, max_num_tokens) if draw.random() < short_seq_prob else max_num_tokens

    rows = array("i")  # C int: 16 bytes a chunk
    assert rows.itemsize == 4
    eligible = corpus.doc_sentences >= 2  # one-sentence documents start no chunk (and draw nothing)
    for index, shard in enumerate(corpus.shards):
        docs = np.flatnonzero(eligible & (corpus.doc_shard == index))
        cum = np.zeros(shard.num_sentences + 1, dtype=np.int64)  # one shard at a time bounds the memory
        np.cumsum(shard.sentence_lengths, dtype=np.int64, out=cum[1:])
        tokens_before = memoryview(cum)
        for doc, start, count in zip(docs.tolist(), corpus.doc_first[docs].tolist(),
                                     corpus.doc_sentences[docs].tolist()):
            stop, begin, goal = start + count, start, target()
            while True:
                if begin == stop - 1:  # a lone last sentence joins the previous chunk of this document
                    rows[-2] = count
                    target()
                    break
                end = bisect_left(tokens_before, tokens_before[begin] + goal, begin + 2, stop)
                rows.extend((doc, begin - start, end - start, goal))
                goal = target()
                if end == stop:
                    break
                begin = end
    if not rows:
        raise DataError(f"{corpus.manifest_path}: no document of split '{corpus.split}' has two sentences")
    return np.frombuffer(rows, dtype=PLAN_DTYPE).reshape(-1, 4)


def plan_key(max_seq_len: int, short_seq_prob: float, seed: int) -> str:
    """The cache's file stem for one setting (``repr`` of the probability: equal floats, equal names)."""
    return f"plan-seq{max_seq_len}-short{float(short_seq_prob)!r}-seed{seed}"


def plan_paths(folder: str | Path, max_seq_len: int, short_seq_prob: float, seed: int) -> tuple[Path, Path]:
    """The ``.npy`` and its ``.json`` sidecar in ``folder``."""
    key = plan_key(max_seq_len, short_seq_prob, seed)  # not with_suffix: the key holds a dot
    return Path(folder) / f"{key}.npy", Path(folder) / f"{key}.json"


def _identity(corpus: Any, key: str) -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "key": key, "split": corpus.split,
            "manifest_sha256": sha256_file(corpus.manifest_path)}


def open_cached(npy: Path, sidecar: Path, identity: dict[str, Any], verify: bool = True) -> np.memmap | None:
    """The cached plan memory-mapped read-only, or None when the cache is absent, stale or damaged. ``verify``
    hashes the ``.npy`` against its sidecar (bytes changed in place keep its header and size)."""
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        if {name: meta.get(name) for name in identity} != identity or meta.get("dtype") != "int32":
            return None
        shape = tuple(int(n) for n in meta["shape"])
        if len(shape) != 2 or shape[1] != 4:
            return None
        with open(npy, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version not in ((1, 0), (2, 0)):
                return None
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            header_shape, fortran, dtype = read_header(handle)
            offset = handle.tell()
        if header_shape != shape or fortran or dtype != np.dtype(PLAN_DTYPE):
            return None
        if npy.stat().st_size != offset + shape[0] * shape[1] * np.dtype(PLAN_DTYPE).itemsize:
            return None  # truncated, or something appended
        if verify and sha256_file(npy) != meta.get("sha256"):
            logger.warning("sample plan %s: its bytes do not match the sha256 in %s (changed after it was built); "
                           "rebuilding it", npy, sidecar.name)
            return None
        plan = np.load(npy, mmap_mode="r")
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return plan if plan.shape == shape and plan.dtype == PLAN_DTYPE else None


def _sweep_dead_temps(npy: Path) -> None:
    """Remove the temp files of this plan that a killed build left (``common.files`` names them
    ``.tmp-<pid>-...-<name>``); a live process's temp stays (two processes may build one plan at once)."""
    for stale in npy.parent.glob(f"{TEMP_MARK}*-{npy.name}"):
        pid = stale.name[len(TEMP_MARK):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            stale.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass


def ensure_cached(corpus: Any, max_seq_len: int, short_seq_prob: float, seed: int, folder: str | Path) -> Path:
    """Build the plan into ``folder`` unless a valid cache is there; the ``.npy``'s path. One process calls this."""
    npy, sidecar = plan_paths(folder, max_seq_len, short_seq_prob, seed)
    identity = _identity(corpus, npy.stem)
    if open_cached(npy, sidecar, identity) is not None:
        return npy
    sidecar.unlink(missing_ok=True)  # from here until the new sidecar lands, no reader trusts the .npy
    _sweep_dead_temps(npy)
    started = time.perf_counter()
    plan = build_sample_plan(corpus, max_seq_len, short_seq_prob, seed)
    seconds = time.perf_counter() - started
    with atomic_path(npy) as temp:  # a replace, never an overwrite: a process mapping the old file keeps it
        np.save(temp, plan, allow_pickle=False)
        digest = sha256_file(temp)
    atomic_write_json(sidecar, {**identity, "shape": list(plan.shape), "dtype": "int32", "sha256": digest})
    logger.info("sample plan: building seq %d (short_seq_prob %s, seed %d): %s chunks of %s documents in %.1f s "
                "-> %s", max_seq_len, short_seq_prob, seed, f"{len(plan):,}", f"{corpus.num_documents:,}", seconds,
                npy)
    return npy


def cached_sample_plan(corpus: Any, max_seq_len: int, short_seq_prob: float, seed: int,
                       folder: str | Path) -> np.memmap:
    """The plan, memory-mapped from ``folder``: global rank 0 builds it there when no valid cache exists (the other
    ranks wait for it; its errors reach every rank), then every rank maps the same file."""
    npy, sidecar = plan_paths(folder, max_seq_len, short_seq_prob, seed)
    on_main_rank(lambda: ensure_cached(corpus, max_seq_len, short_seq_prob, seed, folder))  # the others wait
    plan = open_cached(npy, sidecar, _identity(corpus, npy.stem), verify=False)  # rank 0 just checked or wrote it
    blind = [rank for rank, readable in enumerate(from_every_rank(plan is not None)) if not readable]
    if blind:  # raised on every rank, so none waits for the others
        raise DataError(f"{npy}: rank(s) {blind} cannot read the sample plan rank 0 just wrote there; the folder must "
                        f"be on a file system every rank shares")
    return plan
