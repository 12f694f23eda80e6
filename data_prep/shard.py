"""`shard`: tokenize the sentences with `tokenizers` across workers into token-balanced ``.bin``/``.idx`` shards.

1. Tokenize (``data_prep.fast_tokenize``, ids identical to `tokenizers`): each sentences chunk ->
   ``shards/tokenized/<chunk>.tokens.npy`` + ``.meta.npz`` (per-sentence lengths,
   per-document sentence and token counts, train/validation flag). The meta file is renamed into place last, so
   it marks a finished chunk. A document goes to validation when a hash of (split seed, document id) falls below
   ``validation_fraction``: stable under reordering and resumption. A fraction > 0 never leaves validation empty:
   when no hash falls below it (2% of a 106-document sample), the ``max(1, round(fraction x documents))``
   documents of >= 2 sentences (one-sentence documents make no example) with the lowest hashes go there.
2. Plan: per split, documents are dealt to shards largest first, each to the shard with the fewest tokens so far
   (LPT scheduling) — balanced to far better than 1% once there are a few dozen documents per shard. Within a
   shard, documents keep dump order.
3. Write: each shard's ``.bin``/``.idx`` are written under temp names and renamed (``.idx`` last: a shard counts as
   done only with both). Then ``manifest.json`` (its schema: ``data_prep.indexed``), and the tokenized/ scratch
   directory is removed.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from data_prep.common import PrepError, begin_stage, manifest_digest, ordered_parallel_map, require_manifest, stage_done
from data_prep.fast_tokenize import BatchTokenizer
from data_prep.indexed import (
    FORMAT,
    STAGE,
    FileDigest,
    describe_shard,
    shard_entry,
    token_dtype,
    write_index,
    write_manifest,
)
from data_prep.vocab import TOKENIZER_FILE, VOCAB_FILE, read_vocab
from earlybert_pretrain.common.files import atomic_path, remove_entry, remove_stale_temps, sha256_file

SCRATCH = "tokenized"
SPLITS = ("train", "validation")
ENCODE_BATCH = 4096
BALANCE_TOLERANCE = 0.01

_tokenizer: BatchTokenizer | None = None  # one per worker process, loaded by _init_worker


def _init_worker(tokenizer_path: str) -> None:
    global _tokenizer
    _tokenizer = BatchTokenizer(Tokenizer.from_file(tokenizer_path))


def split_key(doc_id: str, split_seed: int) -> float:
    """A document's place in [0, 1) for the train/validation split: a hash of (split seed, document id)."""
    digest = hashlib.blake2b(f"{split_seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def is_validation(doc_id: str, split_seed: int, fraction: float) -> bool:
    return split_key(doc_id, split_seed) < fraction


def validation_documents(keys: np.ndarray, sentences: np.ndarray, fraction: float) -> np.ndarray:
    """Which documents are validation: a key below ``fraction``, or, where that picks none while fraction > 0, the
    lowest-keyed documents of >= 2 sentences, ``max(1, round(fraction x documents))`` of them, one left to train."""
    chosen = keys < fraction
    if fraction > 0 and not chosen.any():
        usable = np.flatnonzero(sentences >= 2)
        count = min(max(1, round(fraction * len(keys))), len(usable), len(keys) - 1)
        chosen[usable[np.argsort(keys[usable], kind="stable")[:count]]] = True
    return chosen


def _save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` through Python's file write: numpy's own (``tofile``) reports a full disk as "N requested and M
    written" without an errno, which no caller can tell from a bug."""
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        np.lib.format.write_array_header_1_0(out, np.lib.format.header_data_from_array_1_0(array))
        out.write(np.ascontiguousarray(array).data)


def _tokenize_chunk(task: tuple[Path, Path, int, float, str]) -> str:
    """Worker task: one sentences chunk -> its tokens (.npy) and meta (.npz)."""
    source, scratch, split_seed, fraction, dtype_name = task
    docs = []
    with open(source, encoding="utf-8") as handle:
        for line in handle:
            doc = json.loads(line)
            docs.append((str(doc.get("id") or doc.get("title", "")), doc["sentences"]))
    sentences = [s for _, doc_sentences in docs for s in doc_sentences]
    lengths = np.zeros(len(sentences), dtype=np.int64)
    pieces = []
    for start in range(0, len(sentences), ENCODE_BATCH):
        encoded = _tokenizer.encode(sentences[start : start + ENCODE_BATCH])
        lengths[start : start + len(encoded)] = [len(ids) for ids in encoded]
        pieces.append(np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    # Sentences that tokenize to nothing (stray symbols) are dropped, then documents left without sentences.
    per_doc = np.array([len(s) for _, s in docs], dtype=np.int64)
    doc_of_sentence = np.repeat(np.arange(len(docs)), per_doc)
    keep = lengths > 0
    doc_sentences = np.bincount(doc_of_sentence[keep], minlength=len(docs))
    doc_tokens = np.bincount(doc_of_sentence[keep], weights=lengths[keep], minlength=len(docs)).astype(np.int64)
    kept_docs = doc_sentences > 0
    keys = np.array([split_key(doc_id, split_seed) for doc_id, _ in docs], dtype=np.float64)
    base = scratch / source.stem
    _save_npy(base.with_suffix(".tokens.npy"), tokens.astype(dtype_name))
    _save_npy(base.with_suffix(".lengths.npy"), lengths[keep].astype(np.int32))
    with atomic_path(base.with_suffix(".meta.npz")) as tmp, open(tmp, "wb") as out:
        np.savez(out, doc_sentences=doc_sentences[kept_docs], doc_tokens=doc_tokens[kept_docs],
                 doc_split_key=keys[kept_docs], max_token_id=np.int64(tokens.max() if len(tokens) else -1))
    return source.name


def plan_shards(doc_tokens: np.ndarray, num_shards: int) -> np.ndarray:
    """Shard of each document: largest first onto the lightest shard (ties: lower shard, earlier document)."""
    assignment = np.zeros(len(doc_tokens), dtype=np.int64)
    heap = [(0, shard) for shard in range(num_shards)]
    for doc in np.argsort(-doc_tokens, kind="stable"):
        load, shard = heapq.heappop(heap)
        assignment[doc] = shard
        heapq.heappush(heap, (load + int(doc_tokens[doc]), shard))
    return assignment


class _Chunks:
    """All tokenized chunks, with global document numbering in corpus order (the small per-document arrays only)."""

    def __init__(self, scratch: Path, stems: list[str]) -> None:
        self.scratch, self.stems = scratch, stems
        meta = [dict(np.load(scratch / f"{stem}.meta.npz")) for stem in stems]
        self.doc_chunk = np.concatenate([np.full(len(m["doc_tokens"]), i) for i, m in enumerate(meta)])
        self.doc_tokens = np.concatenate([m["doc_tokens"] for m in meta])
        self.doc_sentences = np.concatenate([m["doc_sentences"] for m in meta])
        self.doc_split_key = np.concatenate([m["doc_split_key"] for m in meta])
        self.max_token_id = max(int(m["max_token_id"]) for m in meta)
        # Where each document starts inside its own chunk's token and sentence-length arrays.
        self.doc_token_start = np.concatenate([np.cumsum(m["doc_tokens"]) - m["doc_tokens"] for m in meta])
        self.doc_sentence_start = np.concatenate([np.cumsum(m["doc_sentences"]) - m["doc_sentences"] for m in meta])

    def shard_task(self, docs: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """Per chunk: its file stem and the [token start, tokens, sentence start, sentences] rows of ``docs``."""
        task = []
        for chunk in np.unique(self.doc_chunk[docs]):
            mine = docs[self.doc_chunk[docs] == chunk]
            rows = np.stack([self.doc_token_start[mine], self.doc_tokens[mine], self.doc_sentence_start[mine],
                             self.doc_sentences[mine]], axis=1)
            task.append((self.stems[chunk], rows))
        return task


def _write_shard(task: tuple[Path, str, list[tuple[str, np.ndarray]], Path, str]) -> dict[str, Any]:
    """Worker task: gather one shard's documents (memory-mapped, chunk by chunk) into its .bin/.idx pair."""
    out_dir, name, docs_by_chunk, scratch, dtype_name = task
    bin_path, idx_path = out_dir / f"{name}.bin", out_dir / f"{name}.idx"
    lengths_parts, doc_sentence_counts = [], []
    digest = FileDigest()
    max_id = -1
    with atomic_path(idx_path) as idx_tmp, atomic_path(bin_path) as bin_tmp:
        with open(bin_tmp, "wb") as out:
            for stem, rows in docs_by_chunk:
                tokens = np.load(scratch / f"{stem}.tokens.npy", mmap_mode="r")
                lengths = np.load(scratch / f"{stem}.lengths.npy", mmap_mode="r")
                for token_start, token_count, sentence_start, sentence_count in rows.tolist():
                    piece = np.asarray(tokens[token_start : token_start + token_count])
                    max_id = max(max_id, int(piece.max()))
                    out.write(piece.tobytes())
                    digest.update(piece.tobytes())
                    lengths_parts.append(lengths[sentence_start : sentence_start + sentence_count])
                doc_sentence_counts.extend(rows[:, 3].tolist())
        lengths = np.concatenate(lengths_parts) if lengths_parts else np.zeros(0, dtype=np.int32)
        document_index = np.concatenate([[0], np.cumsum(doc_sentence_counts, dtype=np.int64)])
        idx_digest = write_index(idx_tmp, np.dtype(dtype_name), lengths, document_index)
        # The inner context (.bin) is renamed first, so a finished .idx always has its .bin beside it.
    return shard_entry(bin_path, idx_path, digest.record(), idx_digest, max_id)


def imbalance(tokens: list[int]) -> float:
    """Largest relative deviation of a shard's token count from the mean (0.01 = ±1%)."""
    mean = sum(tokens) / len(tokens) if tokens else 0
    return max(abs(t - mean) / mean for t in tokens) if mean else 0.0


def shard_corpus(
    sentences_dir: str | Path,
    vocab_dir: str | Path,
    out_dir: str | Path,
    num_shards: int = 8,
    validation_fraction: float = 0.01,
    num_validation_shards: int = 1,
    split_seed: int = 12345,
    workers: int = 1,
) -> dict[str, Any]:
    """Run the stage; returns the shard manifest (also written to ``out_dir/manifest.json``)."""
    sentences_dir, vocab_dir, out_dir = Path(sentences_dir), Path(vocab_dir), Path(out_dir)
    if num_shards < 1 or num_validation_shards < 1:
        raise PrepError(f"--num-shards and --num-validation-shards must be >= 1 (got {num_shards}, "
                        f"{num_validation_shards})")
    if not 0.0 <= validation_fraction < 1.0:
        raise PrepError(f"--validation-fraction must be in [0, 1) (got {validation_fraction})")
    upstream = require_manifest(sentences_dir, "sentences")
    vocab_manifest = require_manifest(vocab_dir, "vocab")
    vocab = read_vocab(vocab_dir / VOCAB_FILE)
    vocab_sha = sha256_file(vocab_dir / VOCAB_FILE)
    dtype = token_dtype(len(vocab))
    params = {"format": FORMAT, "input": str(sentences_dir.resolve()), "input_manifest": manifest_digest(upstream),
              "vocab_sha256": vocab_sha, "num_shards": num_shards, "validation_fraction": validation_fraction,
              "num_validation_shards": num_validation_shards, "split_seed": split_seed,
              "validation_rule": "never-empty"}  # shards built when 2% of the sample gave none are rebuilt
    if done := stage_done(out_dir, STAGE, params):
        return done
    scratch = out_dir / SCRATCH
    begin_stage(out_dir, params, ["*.bin", "*.idx", SCRATCH])
    scratch.mkdir(exist_ok=True)
    remove_stale_temps(scratch)
    # Tokenizer parallelism comes from our worker processes; Rust threads on top would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"

    stems = [Path(f["name"]).stem for f in upstream["files"]]
    todo = [(sentences_dir / f"{stem}.jsonl", scratch, split_seed, validation_fraction, dtype.name)
            for stem in stems if not (scratch / f"{stem}.meta.npz").exists()]
    results = ordered_parallel_map(_tokenize_chunk, todo, workers, _init_worker, (str(vocab_dir / TOKENIZER_FILE),))
    for _ in tqdm(results, total=len(todo), desc="tokenize", unit=" chunks", disable=None):
        pass

    chunks = _Chunks(scratch, stems)
    if chunks.max_token_id >= len(vocab):
        raise PrepError(f"{vocab_dir / TOKENIZER_FILE}: produced token id {chunks.max_token_id} >= vocab size "
                        f"{len(vocab)} of {vocab_dir / VOCAB_FILE}")
    tasks, planned = [], {}
    validation = validation_documents(chunks.doc_split_key, chunks.doc_sentences, validation_fraction)
    for split, count in (("train", num_shards), ("validation", num_validation_shards)):
        docs = np.flatnonzero(validation == (split == "validation"))
        if len(docs) == 0:
            if split == "train":
                raise PrepError(f"{sentences_dir}: no training documents (validation fraction {validation_fraction})")
            planned[split] = []
            continue
        count = min(count, len(docs))
        assignment = plan_shards(chunks.doc_tokens[docs], count)
        planned[split] = []
        for shard in range(count):
            name = f"{split}_{shard:05d}"
            planned[split].append(name)
            if not ((out_dir / f"{name}.bin").exists() and (out_dir / f"{name}.idx").exists()):
                tasks.append((out_dir, name, chunks.shard_task(docs[assignment == shard]), scratch, dtype.name))
    written = {}
    for entry in tqdm(ordered_parallel_map(_write_shard, tasks, workers), total=len(tasks), desc="shards",
                      disable=None):
        written[entry["bin"]] = entry

    splits = {split: [written.get(f"{name}.bin") or describe_shard(out_dir / f"{name}.bin", out_dir / f"{name}.idx")
                      for name in names] for split, names in planned.items()}
    for name in (VOCAB_FILE, TOKENIZER_FILE):
        with atomic_path(out_dir / name) as tmp:
            shutil.copyfile(vocab_dir / name, tmp)
    balance = {split: imbalance([f["tokens"] for f in files]) for split, files in splits.items()}
    if balance["train"] > BALANCE_TOLERANCE:
        print(f"warning: {out_dir}: train shards differ by up to {balance['train']:.1%} in tokens "
              f"(too few or too uneven documents for {len(splits['train'])} shards)", file=sys.stderr)
    manifest = write_manifest(out_dir, params=params, dtype=dtype, vocab_file=VOCAB_FILE, vocab_size=len(vocab),
                              special_tokens=vocab_manifest["special_tokens"], tokenizer_file=TOKENIZER_FILE,
                              tokenizer=vocab_manifest["tokenizer"], splits=splits, balance=balance)
    remove_entry(scratch)  # a linked scratch folder: the link, never what it points to
    return manifest
