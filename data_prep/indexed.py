"""The shard format and its manifest: the one module that knows either.

Shards are Megatron-style ``.bin`` + ``.idx`` pairs, both memory-mappable.

``.bin``: every token id of the shard, flat, uint16 when the vocab has at most 65,536 entries, else int32.
``.idx``: a 32-byte header then three little-endian arrays::

    magic  b"EBIDX\\x00\\x00\\x01" | dtype code uint8 (2 = uint16, 4 = int32) | 7 pad bytes
    num_sentences int64 | num_documents int64
    sentence_lengths  int32[num_sentences]       tokens per sentence
    sentence_offsets  int64[num_sentences]       first token of each sentence in .bin (in tokens, not bytes)
    document_index    int64[num_documents + 1]   first sentence of each document; the last entry = num_sentences

``manifest.json`` (format ``earlybert-shards-v2``): the stage's ``params``, the token ``dtype``, ``vocab`` (file,
sha256 of its bytes, size, special tokens), ``tokenizer`` (file, sha256, settings), ``splits`` (per split a list of
shard entries: ``bin``/``idx`` file names, counts, ``max_token_id``, and per file ``<kind>_bytes``,
``<kind>_sha256`` and ``<kind>_blocks``, one blake2b-64 digest per ``block_bytes`` block), ``balance``, ``totals``.

Verification (``verify_shard``), once per shard file per process: ``sizes`` compares sizes only; ``sample`` (the
default) also hashes ``SAMPLED_BLOCKS`` blocks of each file chosen at random per process, so many ranks together
cover much of the corpus for little I/O each; ``full`` hashes every byte against the file's sha256.

Written by ``data_prep.shard``, read by ``earlybert_pretrain.pretrain.batches`` and the pre-training recipe.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.common import MANIFEST
from earlybert_pretrain.common.files import atomic_write_json, read_json, sha256_file
from earlybert_pretrain.errors import DataError

FORMAT = "earlybert-shards-v2"
STAGE = "shard"  # the data-prep stage that writes shards and this manifest
BLOCK_BYTES = 1 << 20
SAMPLED_BLOCKS = 2
VERIFY_MODES = ("sample", "full", "sizes")

MAGIC = b"EBIDX\x00\x00\x01"
HEADER_BYTES = 32
DTYPE_CODES = {2: np.dtype("<u2"), 4: np.dtype("<i4")}


def token_dtype(vocab_size: int) -> np.dtype:
    return DTYPE_CODES[2] if vocab_size <= 1 << 16 else DTYPE_CODES[4]


class FileDigest:
    """The sha256 of a file's bytes and a blake2b-64 digest of each ``BLOCK_BYTES`` block, fed as they are written."""

    def __init__(self) -> None:
        self.whole = hashlib.sha256()
        self.blocks: list[str] = []
        self._block = hashlib.blake2b(digest_size=8)
        self._filled = 0
        self.size = 0

    def update(self, data: bytes) -> None:
        view = memoryview(data)
        while len(view):
            take = min(len(view), BLOCK_BYTES - self._filled)
            self.whole.update(view[:take])
            self._block.update(view[:take])
            self._filled += take
            self.size += take
            view = view[take:]
            if self._filled == BLOCK_BYTES:
                self._next_block()

    def _next_block(self) -> None:
        self.blocks.append(self._block.hexdigest())
        self._block, self._filled = hashlib.blake2b(digest_size=8), 0

    def record(self) -> dict[str, Any]:
        """``{"bytes", "sha256", "blocks"}`` of everything fed so far (the partial last block included)."""
        if self._filled:
            self._next_block()
        return {"bytes": self.size, "sha256": self.whole.hexdigest(), "blocks": list(self.blocks)}


def digest_file(path: Path) -> dict[str, Any]:
    """``FileDigest.record`` of an existing file, read in blocks."""
    digest = FileDigest()
    with open(path, "rb") as handle:
        while chunk := handle.read(BLOCK_BYTES):
            digest.update(chunk)
    return digest.record()


def write_index(
    path: Path, dtype: np.dtype, sentence_lengths: np.ndarray, document_index: np.ndarray
) -> dict[str, Any]:
    """Write an ``.idx`` file; returns its digest record (``FileDigest.record``)."""
    lengths = np.ascontiguousarray(sentence_lengths, dtype="<i4")
    offsets = np.zeros(len(lengths), dtype="<i8")
    np.cumsum(lengths[:-1], out=offsets[1:])
    docs = np.ascontiguousarray(document_index, dtype="<i8")
    code = {v: k for k, v in DTYPE_CODES.items()}[np.dtype(dtype)]
    header = MAGIC + bytes([code]) + bytes(7)
    header += np.array([len(lengths), len(docs) - 1], dtype="<i8").tobytes()
    digest = FileDigest()
    with open(path, "wb") as handle:
        for part in (header, lengths.tobytes(), offsets.tobytes(), docs.tobytes()):
            handle.write(part)
            digest.update(part)
    return digest.record()


class IndexedShard:
    """Memory-mapped view of one ``.bin``/``.idx`` pair; nothing is read until it is indexed."""

    def __init__(self, bin_path: str | Path, idx_path: str | Path) -> None:
        self.bin_path, self.idx_path = Path(bin_path), Path(idx_path)
        for path in (self.bin_path, self.idx_path):
            if not path.is_file():
                raise DataError(f"{path}: shard file not found")
        with open(self.idx_path, "rb") as handle:
            header = handle.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES or header[:8] != MAGIC or header[8] not in DTYPE_CODES:
            raise DataError(f"{self.idx_path}: not an EarlyBERT shard index (bad magic or dtype)")
        self.dtype = DTYPE_CODES[header[8]]
        num_sentences, num_documents = (int(x) for x in np.frombuffer(header[16:32], dtype="<i8"))
        expected = HEADER_BYTES + num_sentences * 12 + (num_documents + 1) * 8
        if self.idx_path.stat().st_size != expected:
            raise DataError(f"{self.idx_path}: size {self.idx_path.stat().st_size} bytes, expected {expected}")
        self.sentence_lengths = self._map("<i4", HEADER_BYTES, num_sentences)
        self.sentence_offsets = self._map("<i8", HEADER_BYTES + num_sentences * 4, num_sentences)
        self.document_index = self._map("<i8", HEADER_BYTES + num_sentences * 12, num_documents + 1)
        self.num_tokens = int(self.sentence_offsets[-1] + self.sentence_lengths[-1]) if num_sentences else 0
        if self.bin_path.stat().st_size != self.num_tokens * self.dtype.itemsize:
            raise DataError(
                f"{self.bin_path}: size {self.bin_path.stat().st_size} bytes, expected "
                f"{self.num_tokens * self.dtype.itemsize} ({self.num_tokens} tokens of {self.dtype.name})"
            )
        self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r") if self.num_tokens else np.zeros(0)

    def _map(self, dtype: str, offset: int, count: int) -> np.ndarray:
        if count == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(self.idx_path, dtype=dtype, mode="r", offset=offset, shape=(count,))

    @property
    def num_sentences(self) -> int:
        return len(self.sentence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_index) - 1

    def sentence(self, index: int) -> np.ndarray:
        start = int(self.sentence_offsets[index])
        return self.tokens[start : start + int(self.sentence_lengths[index])]


# --- the manifest ---------------------------------------------------------------------------------------------------


def shard_entry(bin_path: Path, idx_path: Path, bin_digest: dict[str, Any], idx_digest: dict[str, Any],
                max_token_id: int) -> dict[str, Any]:
    """A shard's manifest entry, from its files' digest records (``FileDigest.record``)."""
    shard = IndexedShard(bin_path, idx_path)
    return {"bin": bin_path.name, "idx": idx_path.name, "documents": shard.num_documents,
            "sentences": shard.num_sentences, "tokens": shard.num_tokens, "max_token_id": max_token_id,
            **{f"bin_{key}": value for key, value in bin_digest.items()},
            **{f"idx_{key}": value for key, value in idx_digest.items()}}


def describe_shard(bin_path: Path, idx_path: Path) -> dict[str, Any]:
    """The manifest entry of a shard already on disk (hashes both files, scans the tokens for the largest id)."""
    shard = IndexedShard(bin_path, idx_path)
    max_token_id = int(shard.tokens.max()) if shard.num_tokens else -1
    return shard_entry(bin_path, idx_path, digest_file(bin_path), digest_file(idx_path), max_token_id)


def write_manifest(out_dir: Path, *, params: dict[str, Any], dtype: np.dtype, vocab_file: str, vocab_size: int,
                   special_tokens: Any, tokenizer_file: str, tokenizer: dict[str, Any],
                   splits: dict[str, list[dict[str, Any]]], balance: dict[str, float]) -> dict[str, Any]:
    """Write ``out_dir/manifest.json`` for shards (and the vocab / tokenizer files) already in ``out_dir``."""
    manifest = {
        "stage": STAGE,
        "format": FORMAT,
        "params": params,
        "dtype": np.dtype(dtype).name,
        "block_bytes": BLOCK_BYTES,
        "vocab": {"file": vocab_file, "sha256": sha256_file(out_dir / vocab_file), "size": vocab_size,
                  "special_tokens": special_tokens},
        "tokenizer": {**tokenizer, "file": tokenizer_file, "sha256": sha256_file(out_dir / tokenizer_file)},
        "splits": splits,
        "balance": balance,
        "totals": {split: {key: sum(entry[key] for entry in entries) for key in ("documents", "sentences", "tokens")}
                   for split, entries in splits.items()},
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


def load_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """The shard folder's manifest; DataError naming the file when it is missing, unreadable or not a shard manifest
    of this format."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: shard manifest not found (run `earlybert-prep shard` or `all` first)")
    manifest = read_json(path, "shard manifest", DataError)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        hint = "; re-run `earlybert-prep shard` to rewrite it" if isinstance(found, str) else ""
        raise DataError(f"{path}: not an {FORMAT} manifest (format {found!r}){hint}")
    return manifest


def vocab_digest(shard_dir: str | Path) -> str:
    """sha256 of the vocab.txt the shards were tokenized with, as their manifest records it (what a run records, so
    a resume can tell re-prepared shards from its own)."""
    return load_manifest(shard_dir)["vocab"]["sha256"]


def check_vocab(shard_dir: str | Path, vocab_size: int, vocab_sha256: str | None = None,
                expected_by: str = "the run") -> None:
    """Raise DataError when the shards were tokenized with another vocabulary than ``expected_by``'s.

    The size is compared with the model's always; the content hash with ``vocab_sha256`` (the run's recorded hash,
    or the sha256 of the model's vocab.txt) when given: two vocabs of one size with other ids differ only there.
    """
    manifest_path = Path(shard_dir) / MANIFEST
    vocab = load_manifest(shard_dir)["vocab"]
    if vocab["size"] != vocab_size:
        raise DataError(f"{manifest_path}: shards use a vocab of {vocab['size']} tokens but the model has {vocab_size}")
    if vocab_sha256 is not None and vocab["sha256"] != vocab_sha256:
        raise DataError(f"{manifest_path}: shards were tokenized with vocab.txt sha256 {vocab['sha256']}, "
                        f"{expected_by} expects {vocab_sha256} (same size, other token ids)")


_verified: set[tuple] = set()  # (file, mode, inode, size, mtime_ns) checked in this process


def verify_shard(shard_dir: Path, entry: dict[str, Any], mode: str = "sample") -> None:
    """Check a shard's files against their manifest entry (``mode`` in VERIFY_MODES, see the module docstring).

    Raises DataError naming the file; each file is checked once per process and mode while it is unchanged.
    """
    if mode not in VERIFY_MODES:
        raise DataError(f"data.verify: expected one of {', '.join(VERIFY_MODES)}, got {mode!r}")
    manifest_path = shard_dir / MANIFEST
    for kind in ("bin", "idx"):
        path, size = shard_dir / entry[kind], entry[f"{kind}_bytes"]
        if not path.is_file():
            raise DataError(f"{path}: shard file listed in {manifest_path} not found")
        stat = path.stat()
        if stat.st_size != size:
            raise DataError(f"{path}: {stat.st_size} bytes, {manifest_path} says {size}")
        key = (str(path.resolve()), mode, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if mode == "sizes" or key in _verified:
            continue
        if mode == "full" and sha256_file(path) != entry[f"{kind}_sha256"]:
            raise DataError(f"{path}: sha256 disagrees with {manifest_path} (corrupt or replaced shard)")
        if mode == "sample":
            _check_blocks(path, entry[f"{kind}_blocks"], manifest_path)
        _verified.add(key)


def _check_blocks(path: Path, blocks: list[str], manifest_path: Path) -> None:
    picked = random.sample(range(len(blocks)), min(SAMPLED_BLOCKS, len(blocks)))
    with open(path, "rb") as handle:
        for block in sorted(picked):
            handle.seek(block * BLOCK_BYTES)
            if hashlib.blake2b(handle.read(BLOCK_BYTES), digest_size=8).hexdigest() != blocks[block]:
                raise DataError(f"{path}: bytes {block * BLOCK_BYTES}..{(block + 1) * BLOCK_BYTES} disagree with the "
                                f"block digest in {manifest_path} (corrupt or replaced shard)")
