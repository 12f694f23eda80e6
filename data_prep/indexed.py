"""The shard format: a Megatron-style ``.bin`` + ``.idx`` pair, both memory-mappable.

``.bin``: every token id of the shard, flat, uint16 when the vocab has at most 65,536 entries, else int32.
``.idx``: a 32-byte header then three little-endian arrays::

    magic  b"EBIDX\\x00\\x00\\x01" | dtype code uint8 (2 = uint16, 4 = int32) | 7 pad bytes
    num_sentences int64 | num_documents int64
    sentence_lengths  int32[num_sentences]       tokens per sentence
    sentence_offsets  int64[num_sentences]       first token of each sentence in .bin (in tokens, not bytes)
    document_index    int64[num_documents + 1]   first sentence of each document; the last entry = num_sentences

Written by ``data_prep.shard``, read by ``earlybert_pretrain.pretrain.batches``: this module is the one place that
knows it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

MAGIC = b"EBIDX\x00\x00\x01"
HEADER_BYTES = 32
DTYPE_CODES = {2: np.dtype("<u2"), 4: np.dtype("<i4")}


def token_dtype(vocab_size: int) -> np.dtype:
    return DTYPE_CODES[2] if vocab_size <= 1 << 16 else DTYPE_CODES[4]


def write_index(
    path: Path, dtype: np.dtype, sentence_lengths: np.ndarray, document_index: np.ndarray
) -> str:
    """Write an ``.idx`` file; returns its sha256."""
    lengths = np.ascontiguousarray(sentence_lengths, dtype="<i4")
    offsets = np.zeros(len(lengths), dtype="<i8")
    np.cumsum(lengths[:-1], out=offsets[1:])
    docs = np.ascontiguousarray(document_index, dtype="<i8")
    code = {v: k for k, v in DTYPE_CODES.items()}[np.dtype(dtype)]
    header = MAGIC + bytes([code]) + bytes(7)
    header += np.array([len(lengths), len(docs) - 1], dtype="<i8").tobytes()
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        for part in (header, lengths.tobytes(), offsets.tobytes(), docs.tobytes()):
            handle.write(part)
            digest.update(part)
    return digest.hexdigest()


class IndexedShard:
    """Memory-mapped view of one ``.bin``/``.idx`` pair; nothing is read until it is indexed."""

    def __init__(self, bin_path: str | Path, idx_path: str | Path) -> None:
        self.bin_path, self.idx_path = Path(bin_path), Path(idx_path)
        for path in (self.bin_path, self.idx_path):
            if not path.is_file():
                raise ValueError(f"{path}: shard file not found")
        with open(self.idx_path, "rb") as handle:
            header = handle.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES or header[:8] != MAGIC or header[8] not in DTYPE_CODES:
            raise ValueError(f"{self.idx_path}: not an EarlyBERT shard index (bad magic or dtype)")
        self.dtype = DTYPE_CODES[header[8]]
        num_sentences, num_documents = (int(x) for x in np.frombuffer(header[16:32], dtype="<i8"))
        expected = HEADER_BYTES + num_sentences * 12 + (num_documents + 1) * 8
        if self.idx_path.stat().st_size != expected:
            raise ValueError(f"{self.idx_path}: size {self.idx_path.stat().st_size} bytes, expected {expected}")
        self.sentence_lengths = self._map("<i4", HEADER_BYTES, num_sentences)
        self.sentence_offsets = self._map("<i8", HEADER_BYTES + num_sentences * 4, num_sentences)
        self.document_index = self._map("<i8", HEADER_BYTES + num_sentences * 12, num_documents + 1)
        self.num_tokens = int(self.sentence_offsets[-1] + self.sentence_lengths[-1]) if num_sentences else 0
        if self.bin_path.stat().st_size != self.num_tokens * self.dtype.itemsize:
            raise ValueError(
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
