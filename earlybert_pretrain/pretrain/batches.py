"""Pre-training data: memory-mapped token shards -> BERT MLM/NSP examples -> rank-disjoint micro-batches.

Shards are the ``.bin``/``.idx`` pairs and ``manifest.json`` written by ``earlybert-prep shard`` (format in
``data_prep.indexed``). Examples follow BERT's ``create_pretraining_data.py``, with masking done at load time:

* Sample plan (once per corpus, seed, max_seq_len): every document is cut into chunks of consecutive sentences
  that reach a target length — ``max_seq_len - 3`` tokens, or with probability ``short_seq_prob`` a random
  length in ``[2, max_seq_len - 3]``. Unlike BERT a chunk always holds >= 2 sentences (a lone sentence at a
  document's end joins the chunk before it; one-sentence documents start no chunk), so the NSP coin below is a
  fair 50/50 rather than forced to "random" for one-sentence chunks. Built by ``sample_plan`` (int32), once per run
  into the run's ``checkpoints/plans/`` and memory-mapped by every rank (the ranks of a node share one copy).
* Example: segment A is the chunk's first ``a_end`` sentences (``a_end`` uniform in [1, n-1]); with probability
  0.5 segment B is the rest of the chunk (label 0), else sentences from a random start in a random other document,
  up to the remaining target length (label 1, the transformers convention). The pair is truncated to
  ``max_seq_len - 3`` from the longer side, each token from the front or back at random, then laid out as
  ``[CLS] A [SEP] B [SEP]`` with token types 0/1 and padded.
* Masking: ``min(max_predictions, max(1, round(len * masked_lm_prob)))`` positions (len counts [CLS]/[SEP], as
  BERT does), chosen among the A/B tokens — whole words when ``whole_word_masking`` — then 80% [MASK], 10% a
  random regular token, 10% unchanged. ``labels`` holds the original id there and -100 elsewhere.

Determinism: epoch ``e`` visits the plan's chunks in the order ``default_rng([seed, e]).permutation(n)``; the
example at position ``i`` of epoch ``e`` draws every random choice (split, NSP, random document, truncation,
masking) from ``default_rng([seed, e, i])``. So an example is a pure function of (seed, epoch, index in epoch)
and global sample ``g`` is (epoch ``g // n``, index ``g % n``): a run resumed at ``start_sample=g`` sees exactly
the batches it would have seen.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import math
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.indexed import IndexedShard, load_manifest, verify_shard
from data_prep.indexed import check_vocab as check_vocab  # the recipe's import; data_prep.indexed defines it
from earlybert_pretrain.common.files import sha256_file
from earlybert_pretrain.common.masking import mask_tokens
from earlybert_pretrain.common.tokens import SPECIAL_TOKENS
from earlybert_pretrain.errors import ConfigError, DataError
from earlybert_pretrain.pretrain.sample_plan import build_sample_plan, cached_sample_plan

RANDOM_NEXT_TRIES = 10
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class ShardedCorpus:
    """The documents of one split, memory-mapped across its shards (nothing is read until sampled)."""

    def __init__(self, shard_dir: str | Path, split: str = "train", verify: str = "sample") -> None:
        self.shard_dir = Path(shard_dir)
        self.manifest_path = self.shard_dir / "manifest.json"
        manifest = load_manifest(self.shard_dir)
        entries = manifest["splits"].get(split) or []
        if not entries:
            raise DataError(f"{self.manifest_path}: no shards for split '{split}'")
        self.split = split
        self.vocab_size: int = manifest["vocab"]["size"]
        self.vocab_path = self.shard_dir / manifest["vocab"]["file"]
        self.vocab = self._read_vocab(manifest["vocab"]["sha256"])
        self.special_ids = {token: self.vocab.index(token) for token in SPECIAL_TOKENS}
        self.shards = [self._open_shard(entry, verify) for entry in entries]
        # Global document table: which shard, first sentence in that shard, sentence count.
        self.doc_shard = np.concatenate(
            [np.full(s.num_documents, i, dtype=np.int32) for i, s in enumerate(self.shards)]
        )
        starts = [np.asarray(s.document_index, dtype=np.int64) for s in self.shards]
        self.doc_first = np.concatenate([d[:-1] for d in starts])
        self.doc_sentences = np.concatenate([np.diff(d) for d in starts])
        self.num_documents = len(self.doc_shard)
        self.num_sentences = sum(s.num_sentences for s in self.shards)
        self.num_tokens = sum(s.num_tokens for s in self.shards)
        self._plans: dict[tuple[int, float, int], np.ndarray] = {}

    def sample_plan(self, max_seq_len: int, short_seq_prob: float, seed: int,
                    cache: str | Path | None = None) -> np.ndarray:
        """The plan once per setting (the search and phase 1 read the same one): memory-mapped from the folder
        ``cache`` (built there once, by global rank 0; ``sample_plan.cached_sample_plan``), else built in memory."""
        key = (max_seq_len, short_seq_prob, seed)
        if key not in self._plans:
            self._plans[key] = (build_sample_plan(self, max_seq_len, short_seq_prob, seed) if cache is None
                                else cached_sample_plan(self, max_seq_len, short_seq_prob, seed, cache))
        return self._plans[key]

    def __getstate__(self) -> dict[str, Any]:
        # Plans are a cache (a mapped one would be copied into the pickle); a stream re-opens its own by path.
        return {**self.__dict__, "_plans": {}}

    def _read_vocab(self, expected_sha256: str) -> list[str]:
        if not self.vocab_path.is_file():
            raise DataError(f"{self.vocab_path}: vocab file named in {self.manifest_path} not found")
        if sha256_file(self.vocab_path) != expected_sha256:
            raise DataError(f"{self.vocab_path}: sha256 differs from the one in {self.manifest_path}")
        tokens = self.vocab_path.read_text(encoding="utf-8").rstrip("\n").split("\n")
        missing = [t for t in SPECIAL_TOKENS if t not in tokens]
        if missing:
            raise DataError(f"{self.vocab_path}: vocab lacks the special token(s) {', '.join(missing)}")
        if len(tokens) != self.vocab_size:
            raise DataError(f"{self.vocab_path}: {len(tokens)} tokens, {self.manifest_path} says {self.vocab_size}")
        return tokens

    def _open_shard(self, entry: dict[str, Any], verify: str) -> IndexedShard:
        verify_shard(self.shard_dir, entry, verify)  # sizes, then sampled blocks or every byte (data.verify)
        shard = IndexedShard(self.shard_dir / entry["bin"], self.shard_dir / entry["idx"])
        if entry["max_token_id"] >= self.vocab_size:
            raise DataError(f"{shard.bin_path}: token id {entry['max_token_id']} >= vocab size {self.vocab_size}")
        if (shard.num_documents, shard.num_sentences, shard.num_tokens) != (
            entry["documents"], entry["sentences"], entry["tokens"]
        ):
            raise DataError(f"{shard.idx_path}: document/sentence/token counts disagree with {self.manifest_path}")
        return shard

    def sentence_lengths(self, doc: int) -> np.ndarray:
        shard = self.shards[self.doc_shard[doc]]
        first = self.doc_first[doc]
        return shard.sentence_lengths[first : first + self.doc_sentences[doc]]

    def span(self, doc: int, begin: int, end: int) -> np.ndarray:
        """Tokens of sentences ``[begin, end)`` of a document (contiguous in its shard), as int64."""
        shard = self.shards[self.doc_shard[doc]]
        first = self.doc_first[doc]
        start = int(shard.sentence_offsets[first + begin])
        stop = int(shard.sentence_offsets[first + end - 1] + shard.sentence_lengths[first + end - 1])
        tokens = np.asarray(shard.tokens[start:stop], dtype=np.int64)
        if len(tokens) and tokens.max() >= self.vocab_size:
            raise DataError(f"{shard.bin_path}: token id {int(tokens.max())} >= vocab size {self.vocab_size}")
        return tokens


def _truncation(len_a: int, len_b: int, max_num_tokens: int) -> tuple[int, int]:
    """Tokens BERT's truncate_seq_pair removes from A and B (one at a time from the longer, B on ties)."""
    excess = len_a + len_b - max_num_tokens
    if excess <= 0:
        return 0, 0
    gap = abs(len_a - len_b)
    if gap >= excess:
        return (excess, 0) if len_a > len_b else (0, excess)
    rest = excess - gap
    cut_a = (gap if len_a > len_b else 0) + rest // 2
    return cut_a, excess - cut_a


class PretrainingBatches:
    """Infinite iterator of BERT pre-training micro-batches for one rank (see the module docstring).

    Global sample ``g`` goes to rank ``g % world_size``; each yielded micro-batch advances ``samples_consumed``
    (a global count, all ranks together) by ``micro_batch_size * world_size``. ``prefetched`` builds the same
    micro-batches ahead in worker processes.
    """

    def __init__(
        self,
        corpus: ShardedCorpus,
        max_seq_len: int,
        max_predictions: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 1234,
        masked_lm_prob: float = 0.15,
        short_seq_prob: float = 0.1,
        whole_word_masking: bool = False,
        start_sample: int = 0,
        plan_cache: str | Path | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if start_sample % world_size:
            raise ValueError(f"start_sample {start_sample} is not a multiple of world_size {world_size}")
        if max_seq_len < 8:
            raise ConfigError(f"max_seq_len {max_seq_len} is too short for [CLS] A [SEP] B [SEP]")
        self.corpus = corpus
        self.max_seq_len = max_seq_len
        self.max_predictions = max_predictions
        self.micro_batch_size = micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.masked_lm_prob, self.short_seq_prob = masked_lm_prob, short_seq_prob
        self.whole_word_masking = whole_word_masking
        self.samples_consumed = start_sample
        self.plan = corpus.sample_plan(max_seq_len, short_seq_prob, seed, plan_cache)
        special = corpus.special_ids
        self.cls_id, self.sep_id, self.mask_id, self.pad_id = (
            special["[CLS]"], special["[SEP]"], special["[MASK]"], special["[PAD]"]
        )
        # Random replacements are drawn from real tokens, never [PAD]/[CLS]/[unused0]-style entries.
        bracketed = np.array([t.startswith("[") and t.endswith("]") for t in corpus.vocab])
        self.regular_ids = np.flatnonzero(~bracketed)
        self.is_continuation = np.array([t.startswith("##") for t in corpus.vocab])
        self._order_epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    def __getstate__(self) -> dict[str, Any]:
        # A memory-mapped plan travels as its path (a spawned worker maps the same file); fork keeps the mapping.
        state = dict(self.__dict__)
        if isinstance(self.plan, np.memmap) and self.plan.filename is not None:
            state["plan"] = Path(self.plan.filename)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["plan"], Path):
            state["plan"] = np.load(state["plan"], mmap_mode="r")
        self.__dict__.update(state)

    @property
    def samples_per_epoch(self) -> int:
        return len(self.plan)

    def state_dict(self) -> dict[str, Any]:
        return {"samples_consumed": self.samples_consumed, "seed": self.seed, "max_seq_len": self.max_seq_len,
                "world_size": self.world_size, "micro_batch_size": self.micro_batch_size}

    def _chunk_at(self, epoch: int, index: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.plan))
            self._order_epoch = epoch
        return self.plan[self._order[index]]

    def example(self, global_index: int) -> dict[str, np.ndarray]:
        """Global sample ``global_index`` as int64 numpy arrays (the batch rows before stacking)."""
        epoch, index = divmod(global_index, len(self.plan))
        doc, begin, end, target = (int(x) for x in self._chunk_at(epoch, index))
        rng = np.random.default_rng([self.seed, epoch, index])
        corpus = self.corpus
        a_end = begin + int(rng.integers(1, end - begin))
        tokens_a = corpus.span(doc, begin, a_end)
        if rng.random() < 0.5:
            random_next = 1
            other = doc
            for _ in range(RANDOM_NEXT_TRIES):
                other = int(rng.integers(corpus.num_documents))
                if other != doc:
                    break
            lengths = corpus.sentence_lengths(other)
            first = int(rng.integers(len(lengths)))
            wanted = max(1, target - len(tokens_a))
            reach = np.cumsum(lengths[first:])
            last = first + min(int(np.searchsorted(reach, wanted)), len(reach) - 1) + 1
            tokens_b = corpus.span(other, first, last)
        else:
            random_next = 0
            tokens_b = corpus.span(doc, a_end, end)
        cut_a, cut_b = _truncation(len(tokens_a), len(tokens_b), self.max_seq_len - 3)
        tokens_a = self._trim(tokens_a, cut_a, rng)
        tokens_b = self._trim(tokens_b, cut_b, rng)

        len_a, len_b = len(tokens_a), len(tokens_b)
        length = len_a + len_b + 3
        input_ids = np.full(self.max_seq_len, self.pad_id, dtype=np.int64)
        input_ids[0] = self.cls_id
        input_ids[1 : 1 + len_a] = tokens_a
        input_ids[1 + len_a] = self.sep_id
        input_ids[2 + len_a : 2 + len_a + len_b] = tokens_b
        input_ids[length - 1] = self.sep_id
        token_type_ids = np.zeros(self.max_seq_len, dtype=np.int64)
        token_type_ids[2 + len_a : length] = 1
        attention_mask = np.zeros(self.max_seq_len, dtype=np.int64)
        attention_mask[:length] = 1
        labels = self._mask(input_ids, len_a, len_b, rng)
        return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
                "labels": labels, "next_sentence_label": np.int64(random_next)}

    @staticmethod
    def _trim(tokens: np.ndarray, cut: int, rng: np.random.Generator) -> np.ndarray:
        if cut == 0:
            return tokens
        from_front = int(rng.binomial(cut, 0.5))
        return tokens[from_front : len(tokens) - (cut - from_front)]

    def _mask(self, input_ids: np.ndarray, len_a: int, len_b: int, rng: np.random.Generator) -> np.ndarray:
        """Mask ``input_ids`` in place (``common.masking``: BERT's 80/10/10 rule); returns the labels."""
        candidates = np.concatenate([np.arange(1, 1 + len_a), np.arange(2 + len_a, 2 + len_a + len_b)])
        budget = min(self.max_predictions, max(1, int(round((len_a + len_b + 3) * self.masked_lm_prob))))
        return mask_tokens(input_ids, candidates, budget, rng, self.mask_id, self.regular_ids,
                           self.is_continuation if self.whole_word_masking else None)

    def batch_indices(self, first_global: int) -> list[int]:
        """Global sample indices of this rank's micro-batch that starts at global sample ``first_global``."""
        return [first_global + j * self.world_size + self.rank for j in range(self.micro_batch_size)]

    def arrays(self, first_global: int) -> dict[str, np.ndarray]:
        """This rank's micro-batch that starts at global sample ``first_global``, stacked into int64 arrays."""
        rows = [self.example(g) for g in self.batch_indices(first_global)]
        return {key: np.stack([row[key] for row in rows]) for key in rows[0]}

    def batch(self, first_global: int) -> dict[str, torch.Tensor]:
        """``arrays(first_global)`` as tensors (sharing their memory)."""
        return {key: torch.from_numpy(value) for key, value in self.arrays(first_global).items()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            batch = self.batch(self.samples_consumed)
            self.samples_consumed += self.micro_batch_size * self.world_size
            yield batch


class MicroBatches(torch.utils.data.Dataset):
    """Micro-batch ``m`` of a stream opened at ``start_sample``: a pure function of the index, so any worker can
    build any of them and a DataLoader hands them back in index order."""

    def __init__(self, stream: PretrainingBatches) -> None:
        self.stream = stream
        self.start = stream.samples_consumed
        self.stride = stream.micro_batch_size * stream.world_size

    def __getitem__(self, index: int) -> ArrayBatch:
        return ArrayBatch(self.stream.arrays(self.start + index * self.stride))


class ArrayBatch:
    """A micro-batch crossing from a worker as numpy arrays: pickled through the loader's pipe in ~0.3 ms, where
    tensors would each take a shared-memory segment (~3 ms for a batch's five; measured at 32 x 128). Not a Mapping,
    so the loader neither converts it nor pins it field by field: its pin thread calls ``pin_memory`` (CUDA)."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays

    def tensors(self) -> dict[str, torch.Tensor]:
        return {key: torch.from_numpy(value) for key, value in self.arrays.items()}

    def pin_memory(self, device: str | None = None) -> dict[str, torch.Tensor]:
        return {key: tensor.pin_memory() for key, tensor in self.tensors().items()}


def _die_with_trainer(trainer_pid: int, worker_id: int) -> None:
    """Worker start: a killed training process takes its workers along at once. They inherit its run lock (an
    flock, held while any copy of the file stays open), so a ``--resume`` right after a SIGKILL would otherwise find
    the folder locked until the loader's watchdog (~5 s) noticed the orphans."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != trainer_pid:  # the trainer died before prctl took effect
        os._exit(0)


def prefetched(stream: PretrainingBatches, num_workers: int, prefetch: int, pin_memory: bool = False,
               step_batches: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """The stream's micro-batches from ``stream.samples_consumed`` on, built ahead by ``num_workers`` processes (0: in
    this process, when asked), pinned when ``pin_memory``.

    Each worker keeps ``prefetch`` micro-batches in flight, or more where the workers together would hold fewer than
    ``step_batches`` (the micro-batches of one optimizer step, i.e. the gradient accumulation): while a step computes,
    the workers build the whole next step. Fewer, and most of each step's batches would be built while it waits
    (8 in flight for 128 micro-batches a step: 94%).

    How far the workers ran ahead is never a resume position: a stage reopens its batches from the optimizer
    step it resumes at, and every batch is a pure function of its index.
    """
    if num_workers == 0:
        return iter(stream)
    loader = torch.utils.data.DataLoader(
        MicroBatches(stream), batch_size=None, sampler=itertools.count(), num_workers=num_workers,
        prefetch_factor=max(prefetch, math.ceil(step_batches / num_workers)), pin_memory=pin_memory,
        persistent_workers=False,
        # fork shares the memory-mapped shards and plan (an in-memory plan copy-on-write) instead of pickling them
        multiprocessing_context="fork", worker_init_fn=functools.partial(_die_with_trainer, os.getpid()),
        # a private generator: the loader's base seed must not advance the global torch RNG (dropout)
        generator=torch.Generator().manual_seed(stream.seed))
    if pin_memory:  # the loader's pin thread made each ArrayBatch pinned tensors
        return iter(loader)
    return (batch.tensors() for batch in loader)
