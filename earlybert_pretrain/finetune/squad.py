"""SQuAD v1.1 features (sliding windows over the context) and answer extraction, as in BERT's run_squad.py.

Paper defaults (Sec. 4.1, BERT's recipe): max_seq_length 384, doc_stride 128, max_query_length 64, n-best 20,
max_answer_length 30. ``doc_stride`` is BERT's: the distance between the starts of two consecutive windows. A token
seen by several windows is only allowed to start an answer in the window where it has the most context on both sides
(BERT's ``_check_is_max_context``). Answer text is cut from the original context with the tokenizer's character
offsets, so a predicted span is always a substring of the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import numpy as np


@dataclass(frozen=True)
class SquadSettings:
    max_seq_length: int = 384
    doc_stride: int = 128
    max_query_length: int = 64
    n_best_size: int = 20
    max_answer_length: int = 30


def _windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int]]:
    """(start, length) of each window over ``num_tokens`` context tokens; the last one reaches the end."""
    spans, start = [], 0
    while True:
        length = min(window, num_tokens - start)
        spans.append((start, length))
        if start + length >= num_tokens:
            return spans
        start += min(length, stride)


def _max_context_flags(spans: list[tuple[int, int]], span_index: int) -> list[bool]:
    """For each token of window ``span_index``: is this the window where it has the most context?"""
    start, length = spans[span_index]
    flags = []
    for position in range(start, start + length):
        best_score, best_span = None, None
        for index, (other_start, other_length) in enumerate(spans):
            if not other_start <= position < other_start + other_length:
                continue
            score = min(position - other_start, other_start + other_length - 1 - position) + 0.01 * other_length
            if best_score is None or score > best_score:
                best_score, best_span = score, index
        flags.append(best_span == span_index)
    return flags


def build_features(examples: datasets.Dataset, tokenizer, settings: SquadSettings, training: bool) -> datasets.Dataset:
    """One row per window: input_ids, token_type_ids, the example index, and for training the answer's token
    start/end positions (0 = [CLS] when the answer is not inside the window), for evaluation the context character
    offsets of each token (None outside the context) and the max-context flags. Training leaves out questions whose
    answer is not found in their context (``data.py`` counts them; the trainer counts examples left without a row)."""
    questions = tokenizer(list(examples["question"]), add_special_tokens=False)["input_ids"]
    contexts = tokenizer(list(examples["context"]), add_special_tokens=False, return_offsets_mapping=True)
    columns = {"input_ids": [], "token_type_ids": [], "example_index": [], "offsets": [], "max_context": [],
               "start_position": [], "end_position": []}
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    context_texts = list(examples["context"])
    answer_column = list(examples["answers"]) if training else None
    for index, (question, context_ids, offsets) in enumerate(
            zip(questions, contexts["input_ids"], contexts["offset_mapping"])):
        question = question[:settings.max_query_length]
        answer_tokens = None
        if training:
            answers, context = answer_column[index], context_texts[index]
            if not answers["text"]:
                continue
            char_start, text = answers["answer_start"][0], answers["text"][0]
            if context[char_start:char_start + len(text)] != text:
                continue
            char_end = char_start + len(text)
            inside = [i for i, (s, e) in enumerate(offsets) if s < char_end and e > char_start]
            if not inside:
                continue
            answer_tokens = (inside[0], inside[-1])
        window = settings.max_seq_length - len(question) - 3  # [CLS] question [SEP] window [SEP]
        spans = _windows(len(context_ids), window, settings.doc_stride)
        for span_index, (start, length) in enumerate(spans):
            prefix = [cls_id, *question, sep_id]
            columns["input_ids"].append(prefix + context_ids[start:start + length] + [sep_id])
            columns["token_type_ids"].append([0] * len(prefix) + [1] * (length + 1))
            columns["example_index"].append(index)
            columns["offsets"].append([None] * len(prefix) + [list(o) for o in offsets[start:start + length]]
                                      + [None])
            columns["max_context"].append([False] * len(prefix) + _max_context_flags(spans, span_index) + [False])
            start_position = end_position = 0
            if answer_tokens is not None and start <= answer_tokens[0] and answer_tokens[1] < start + length:
                start_position = answer_tokens[0] - start + len(prefix)
                end_position = answer_tokens[1] - start + len(prefix)
            columns["start_position"].append(start_position)
            columns["end_position"].append(end_position)
    if training:
        del columns["offsets"], columns["max_context"]
    else:
        del columns["start_position"], columns["end_position"]
    return datasets.Dataset.from_dict(columns)


def extract_answers(examples: datasets.Dataset, features: datasets.Dataset, start_logits: np.ndarray,
                    end_logits: np.ndarray, settings: SquadSettings) -> dict[str, str]:
    """Best span per example over all its windows: the n-best starts x n-best ends of each window, spans inside the
    context, start <= end, at most ``max_answer_length`` tokens, start token in its max-context window; score =
    start logit + end logit. ``start_logits[i]`` belongs to ``features[i]`` (padding positions may follow)."""
    best: dict[int, tuple[float, str]] = {}
    contexts = list(examples["context"])
    for feature_index, feature in enumerate(features):
        offsets, max_context = feature["offsets"], feature["max_context"]
        length = len(offsets)
        starts, ends = start_logits[feature_index][:length], end_logits[feature_index][:length]
        top_starts = np.argsort(-starts, kind="stable")[:settings.n_best_size]
        top_ends = np.argsort(-ends, kind="stable")[:settings.n_best_size]
        example_index = feature["example_index"]
        for start in top_starts:
            if offsets[start] is None or not max_context[start]:
                continue
            for end in top_ends:
                if offsets[end] is None or end < start or end - start + 1 > settings.max_answer_length:
                    continue
                score = float(starts[start] + ends[end])
                if example_index not in best or score > best[example_index][0]:
                    text = contexts[example_index][offsets[start][0]:offsets[end][1]]
                    best[example_index] = (score, text)
    ids = list(examples["id"])
    return {ids[index]: best[index][1] if index in best else "" for index in range(len(examples))}
