"""`vocab`: train an uncased WordPiece vocabulary with `tokenizers`, or adopt an existing vocab.txt/tokenizer.json.

Output: ``vocab.txt`` (one token per line, id = line number) and ``tokenizer.json`` (BERT normalizer and
pre-tokenizer, WordPiece model) — the shard stage tokenizes with the latter, the loader reads the former.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tokenizers import BertWordPieceTokenizer, Tokenizer

from data_prep.common import MANIFEST, PrepError, manifest_digest, require_manifest, stage_done
from earlybert_pretrain.common.files import atomic_path, atomic_write_json, sha256_file
from earlybert_pretrain.common.tokens import SPECIAL_TOKENS

STAGE = "vocab"
VOCAB_FILE = "vocab.txt"
TOKENIZER_FILE = "tokenizer.json"


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
        shutil.copyfile(existing, out_dir / TOKENIZER_FILE)
    else:
        read_vocab(existing)
        with atomic_path(out_dir / VOCAB_FILE) as tmp:
            shutil.copyfile(existing, tmp)
        _write_tokenizer_from_vocab(out_dir / VOCAB_FILE, out_dir, lowercase)


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
    (out_dir / MANIFEST).unlink(missing_ok=True)
    if existing is not None:
        _adopt(existing, out_dir, lowercase)
    else:
        names = [f["name"] for f in upstream["files"]]
        tokenizer = BertWordPieceTokenizer(lowercase=lowercase, strip_accents=lowercase)
        tokenizer.train_from_iterator(
            _iter_sentences(sentences_dir, names),
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            show_progress=False,
            length=upstream["stats"]["sentences"],
        )
        # The trainer's token order varies between runs (hash-map iteration), so ids would too: write the tokens in
        # one canonical order (special tokens first, then by code point) and build tokenizer.json from that file.
        trained = set(tokenizer.get_vocab()) - set(SPECIAL_TOKENS)
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
