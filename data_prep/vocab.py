"""`vocab`: train an uncased WordPiece vocabulary with `tokenizers`, or adopt an existing vocab.txt/tokenizer.json.

Output: ``vocab.txt`` (one token per line, id = line number) and ``tokenizer.json`` (BERT normalizer and
pre-tokenizer, WordPiece model) — the shard stage tokenizes with the latter, the loader reads the former.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tokenizers import BertWordPieceTokenizer, Tokenizer

from data_prep.common import MANIFEST, PrepError, manifest_digest, require_manifest, stage_done
from earlybert_pretrain.common.files import atomic_path, atomic_write_json, remove_stale_temps, sha256_file
from earlybert_pretrain.common.tokens import SPECIAL_TOKENS

STAGE = "vocab"
VOCAB_FILE = "vocab.txt"
TOKENIZER_FILE = "tokenizer.json"
LIMIT_ALPHABET = 1000  # characters kept before the merges (the tokenizers trainer's default)
WORDPIECE_PREFIX = "##"


def read_vocab(path: str | Path) -> list[str]:
    """Tokens of a vocab.txt, checked to hold BERT's special tokens."""
    path = Path(path)
    if not path.is_file():
        raise PrepError(f"{path}: vocab file not found")
    try:
        tokens = path.read_text(encoding="utf-8").rstrip("\n").split("\n")
    except UnicodeDecodeError as exc:
        raise PrepError(f"{path}: not a UTF-8 vocab file (byte {exc.start}: {exc.reason})") from None
    missing = [t for t in SPECIAL_TOKENS if t not in set(tokens)]
    if missing:
        raise PrepError(f"{path}: vocab lacks the special token(s) {', '.join(missing)}")
    return tokens


def _iter_sentences(sentences_dir: Path, names: list[str], batch: int = 1000) -> Iterator[list[str]]:
    buffer: list[str] = []
    for name in names:
        with open(sentences_dir / name, encoding="utf-8") as handle:
            for line in handle:
                buffer.extend(json.loads(line)["sentences"])
                if len(buffer) >= batch:
                    yield buffer
                    buffer = []
    if buffer:
        yield buffer


def _write_tokenizer_from_vocab(vocab_path: Path, out_dir: Path, lowercase: bool) -> None:
    tokenizer = BertWordPieceTokenizer(str(vocab_path), lowercase=lowercase, strip_accents=lowercase)
    with atomic_path(out_dir / TOKENIZER_FILE) as tmp:
        tokenizer.save(str(tmp))


def _adopt(existing: Path, out_dir: Path, lowercase: bool) -> None:
    """Copy a user-given vocab.txt or tokenizer.json into ``out_dir`` as the vocab.txt + tokenizer.json pair."""
    if not existing.is_file():
        raise PrepError(f"{existing}: vocab file not found")
    if existing.suffix == ".json":
        try:
            tokenizer = Tokenizer.from_file(str(existing))
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise PrepError(f"{existing}: not a tokenizers tokenizer.json ({exc})") from exc
        by_id = sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
        if [i for _, i in by_id] != list(range(len(by_id))):
            raise PrepError(f"{existing}: token ids are not contiguous from 0")
        with atomic_path(out_dir / VOCAB_FILE) as tmp:
            tmp.write_text("".join(f"{token}\n" for token, _ in by_id), encoding="utf-8")
        try:
            read_vocab(out_dir / VOCAB_FILE)
        except PrepError as exc:
            (out_dir / VOCAB_FILE).unlink()
            raise PrepError(str(exc).replace(str(out_dir / VOCAB_FILE), str(existing))) from exc
        with atomic_path(out_dir / TOKENIZER_FILE) as tmp:
            shutil.copyfile(existing, tmp)
    else:
        read_vocab(existing)
        with atomic_path(out_dir / VOCAB_FILE) as tmp:
            shutil.copyfile(existing, tmp)
        _write_tokenizer_from_vocab(out_dir / VOCAB_FILE, out_dir, lowercase)


def _alphabet(sentences_dir: Path, names: list[str], lowercase: bool) -> list[str]:
    """The ``LIMIT_ALPHABET`` most frequent characters of the normalized text (ties: by code point), as the trainer
    would keep them but without its hash-ordered tie-break; sorted by code point."""
    normalizer = BertWordPieceTokenizer(lowercase=lowercase, strip_accents=lowercase).normalizer
    counts: Counter[str] = Counter()
    for batch in _iter_sentences(sentences_dir, names):
        counts.update(normalizer.normalize_str("\n".join(batch)))
    ranked = sorted((c for c in counts if not c.isspace()), key=lambda c: (-counts[c], c))
    return sorted(ranked[:LIMIT_ALPHABET])


def _run_trainer(sentences_dir: Path, names: list[str], sentences: int, vocab_size: int, min_frequency: int,
                 lowercase: bool, alphabet: list[str], first_tokens: list[str]) -> set[str]:
    tokenizer = BertWordPieceTokenizer(lowercase=lowercase, strip_accents=lowercase)
    tokenizer.train_from_iterator(_iter_sentences(sentences_dir, names), vocab_size=vocab_size,
                                  min_frequency=min_frequency, special_tokens=[*SPECIAL_TOKENS, *first_tokens],
                                  limit_alphabet=len(alphabet), initial_alphabet=alphabet, show_progress=False,
                                  length=sentences)
    return set(tokenizer.get_vocab()) - set(SPECIAL_TOKENS)


def _train(sentences_dir: Path, names: list[str], sentences: int, vocab_size: int, min_frequency: int,
           lowercase: bool) -> set[str]:
    """The trained WordPiece tokens (special tokens left out), the same set on every run.

    The trainer (tokenizers' BPE trainer under WordPiece) merges the most frequent pair and breaks ties by the pair's
    token ids; single characters get ids by code point, but the "##c" continuation tokens get theirs in the order a
    hash map of the words is walked, which is seeded at random per process. Ties between equal pair counts therefore
    went differently from run to run (RAYON_NUM_THREADS=1 as well: not a threading effect) and so did the tokens that
    made the cut. Fixed here by giving every id a fixed place before the merges: the alphabet is chosen here (the
    trainer's own cut of it sorts by count with an unstable tie-break too), and a first pass with no merges lists the
    "##c" tokens, which the real pass then registers first, in code-point order.
    """
    alphabet = _alphabet(sentences_dir, names, lowercase)
    first_pass = _run_trainer(sentences_dir, names, sentences, 0, min_frequency, lowercase, alphabet, [])
    continuations = sorted(token for token in first_pass if token.startswith(WORDPIECE_PREFIX)
                           and len(token) == len(WORDPIECE_PREFIX) + 1)
    return _run_trainer(sentences_dir, names, sentences, vocab_size, min_frequency, lowercase, alphabet,
                        continuations)


def build_vocab(
    sentences_dir: str | Path | None,
    out_dir: str | Path,
    vocab_size: int = 30_522,
    existing: str | Path | None = None,
    lowercase: bool = True,
    min_frequency: int = 2,
) -> dict[str, Any]:
    """Train (``existing`` None) or adopt a vocabulary; returns this stage's manifest."""
    out_dir = Path(out_dir)
    params: dict[str, Any] = {"lowercase": lowercase}
    if existing is not None:
        existing = Path(existing)
        if not existing.is_file():
            raise PrepError(f"{existing}: vocab file not found")
        params.update(existing=str(existing.resolve()), existing_sha256=sha256_file(existing))
    else:
        if sentences_dir is None:
            raise PrepError("vocab: give the sentences directory to train on, or --vocab-file to adopt one")
        if vocab_size <= len(SPECIAL_TOKENS):
            raise PrepError(f"--vocab-size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
        sentences_dir = Path(sentences_dir)
        upstream = require_manifest(sentences_dir, "sentences")
        params.update(input=str(sentences_dir.resolve()), input_manifest=manifest_digest(upstream),
                      vocab_size=vocab_size, min_frequency=min_frequency)
    if done := stage_done(out_dir, STAGE, params):
        return done
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)  # a killed run's temp copies (the output folder's lock is held)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    if existing is not None:
        _adopt(existing, out_dir, lowercase)
    else:
        names = [f["name"] for f in upstream["files"]]
        trained = _train(sentences_dir, names, upstream["stats"]["sentences"], vocab_size, min_frequency, lowercase)
        # The trainer's token order varies between runs (hash-map iteration), so ids would too: write the tokens in
        # one canonical order (special tokens first, then by code point) and build tokenizer.json from that file.
        with atomic_path(out_dir / VOCAB_FILE) as tmp:
            tmp.write_text("".join(f"{token}\n" for token in [*SPECIAL_TOKENS, *sorted(trained)]), encoding="utf-8")
        _write_tokenizer_from_vocab(out_dir / VOCAB_FILE, out_dir, lowercase)
    tokens = read_vocab(out_dir / VOCAB_FILE)
    manifest = {
        "stage": STAGE,
        "params": params,
        "vocab_size": len(tokens),
        "special_tokens": {t: tokens.index(t) for t in SPECIAL_TOKENS},
        "tokenizer": {"type": "BertWordPiece", "lowercase": lowercase, "strip_accents": lowercase,
                      "clean_text": True, "handle_chinese_chars": True, "wordpieces_prefix": "##"},
        "files": [{"name": name, "bytes": (out_dir / name).stat().st_size, "sha256": sha256_file(out_dir / name)}
                  for name in (VOCAB_FILE, TOKENIZER_FILE)],
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest
