"""Helpers for the fine-tuning tests (no tests here): a tiny BERT folder with its own vocab, small task files."""

from __future__ import annotations

import json
import random
from pathlib import Path

from earlybert_pretrain.common.tokens import SPECIAL_TOKENS
from earlybert_pretrain.model.bert import BertConfig, BertForPreTraining
from earlybert_pretrain.model.hf import save_pretrained

POSITIVE = ["good", "great", "fine", "happy", "lovely", "nice"]
NEGATIVE = ["bad", "awful", "poor", "sad", "ugly", "boring"]
FILLER = ["the", "a", "film", "movie", "plot", "was", "is", "very", "quite", "and", "it", "story", "cat", "sat",
          "on", "mat", "dog", "ran", "in", "park", "paris", "capital", "of", "france", "who", "what", "where",
          "when", "city", "river", "flows", "through", "built", "1889", "tower", "eiffel", "?", ".", ","]
VOCAB = list(SPECIAL_TOKENS) + POSITIVE + NEGATIVE + FILLER
TINY_CONFIG = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0)


def make_tiny_model(folder: Path, seed: int = 0, **overrides) -> Path:
    """A randomly initialised BertForPreTraining saved as an HF folder with a matching vocab.txt."""
    import torch

    torch.manual_seed(seed)
    save_pretrained(BertForPreTraining(BertConfig(**{**TINY_CONFIG, **overrides})), folder)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return folder


def sentiment_rows(count: int, seed: int) -> list[dict]:
    """Single sentences whose label is whether a positive word occurs (learnable by a tiny model)."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        label = index % 2
        words = rng.sample(FILLER[:12], 4) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_tsv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(str(v) for v in row) + "\n" for row in rows))
    return path
