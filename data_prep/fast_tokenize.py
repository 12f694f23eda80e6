"""Batch tokenization with an exact fast path for ASCII sentences (most of English Wikipedia).

`tokenizers` spends most of its time building Encoding objects (offsets, token strings) we never use. For a
sentence that is ASCII (or becomes ASCII once the uncased normalizer strips its accents: "café" -> "cafe"),
BERT's normalizer and pre-tokenizer reduce to: drop control characters, lowercase, split into runs of
``[A-Za-z0-9]`` and single punctuation characters (every other printable ASCII character is punctuation to
BERT). Each distinct word then goes through the same WordPiece model once and is cached. Other sentences,
sentences holding an added token's text, and tokenizers whose normalizer/pre-tokenizer are not BERT's take the
plain `encode_batch_fast` path. ``tests/test_data_prep.py`` checks both paths give identical ids on the whole
real dump.
"""

from __future__ import annotations

import json
import re
import sys
import unicodedata
from itertools import chain

from tokenizers import Tokenizer

WORD = re.compile(r"[A-Za-z0-9]+|[!-/:-@\[-`{-~]")
ASCII_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
CACHE_LIMIT = 2_000_000
# str.translate table deleting every combining mark (category Mn), as BERT's accent stripping does.
COMBINING_MARKS = dict.fromkeys(c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Mn")


class _WordPieceCache(dict):
    """word -> WordPiece ids, filled on first sight by the tokenizer's own model."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.model = tokenizer.model

    def __missing__(self, word: str) -> list[int]:
        if len(self) >= CACHE_LIMIT:
            self.clear()
        ids = self[word] = [token.id for token in self.model.tokenize(word)]
        return ids


class BatchTokenizer:
    """``encode(sentences) -> list[list[int]]`` without special tokens, identical to ``Tokenizer.encode_batch``."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        spec = json.loads(tokenizer.to_str())
        normalizer, pre_tokenizer = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}
        self.fast = (
            normalizer.get("type") == "BertNormalizer"
            and normalizer.get("clean_text", False)
            and pre_tokenizer.get("type") == "BertPreTokenizer"
            and (spec.get("model") or {}).get("type") == "WordPiece"
        )
        # Added tokens ("[MASK]" typed in the text) are matched before normalization: leave those to tokenizers.
        added = [re.escape(token["content"]) for token in spec.get("added_tokens") or []]
        self.added = re.compile("|".join(added)) if added else None
        self.lowercase = bool(normalizer.get("lowercase"))
        # BertNormalizer strips accents when asked, or by default when lowercasing.
        strip = normalizer.get("strip_accents")
        self.strip_accents = self.lowercase if strip is None else bool(strip)
        self.cache = _WordPieceCache(tokenizer)

    def encode(self, sentences: list[str]) -> list[list[int]]:
        result: list[list[int] | None] = [None] * len(sentences)
        slow: list[int] = []
        lookup = self.cache.__getitem__
        for index, sentence in enumerate(sentences):
            text = sentence
            if self.fast and not text.isascii() and self.strip_accents:
                # "Café" -> "cafe": the normalizer's own steps (NFD, drop combining marks, lowercase); a sentence
                # that is ASCII afterwards tokenizes like one that was ASCII from the start.
                text = unicodedata.normalize("NFD", text).translate(COMBINING_MARKS)
                if self.lowercase:
                    text = text.lower()
            if not self.fast or not text.isascii() or (self.added and self.added.search(sentence)):
                slow.append(index)
                continue
            text = ASCII_CONTROL.sub("", text)
            if self.lowercase:
                text = text.lower()
            # map/chain keep the per-word work in C; only cache misses run Python (__missing__).
            result[index] = list(chain.from_iterable(map(lookup, WORD.findall(text))))
        if slow:
            encodings = self.tokenizer.encode_batch_fast([sentences[i] for i in slow], add_special_tokens=False)
            for index, encoding in zip(slow, encodings):
                result[index] = encoding.ids
        return result  # type: ignore[return-value]
