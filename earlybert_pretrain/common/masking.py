"""BERT's masked-LM rule, in one place for pre-training batches and the fine-tuning MLM search (Appendix B).

``mask_tokens`` picks ``budget`` of the ``candidates`` positions (whole words when ``is_continuation`` is given: a
"##" piece right after another candidate continues that word), then replaces 80% of them by [MASK], 10% by a random
regular token and leaves 10% unchanged. Every random choice comes from ``rng``, in a fixed order, so a caller that
seeds ``rng`` from (seed, example) gets the same masks on every run and rank.
"""

from __future__ import annotations

import numpy as np

from earlybert_pretrain.common.tokens import IGNORE_INDEX


def _whole_words(input_ids: np.ndarray, candidates: np.ndarray, budget: int, rng: np.random.Generator,
                 is_continuation: np.ndarray) -> np.ndarray:
    """Whole words of at most ``budget`` pieces in all, in a random order of words (never across [SEP])."""
    continues = is_continuation[input_ids[candidates]]
    continues[1:] &= np.diff(candidates) == 1
    if len(continues):
        continues[0] = False
    words = np.split(candidates, np.flatnonzero(~continues)[1:])
    chosen_words, taken = [], 0
    for word in rng.permutation(len(words)):
        if taken + len(words[word]) <= budget:
            chosen_words.append(words[word])
            taken += len(words[word])
        if taken == budget:
            break
    return np.sort(np.concatenate(chosen_words)) if chosen_words else np.zeros(0, dtype=np.int64)


def mask_tokens(input_ids: np.ndarray, candidates: np.ndarray, budget: int, rng: np.random.Generator, mask_id: int,
                regular_ids: np.ndarray, is_continuation: np.ndarray | None = None) -> np.ndarray:
    """Mask ``input_ids`` (1-D) in place; returns the labels: the original id at masked positions, -100 elsewhere."""
    if is_continuation is not None:
        chosen = _whole_words(input_ids, candidates, budget, rng, is_continuation)
    else:
        chosen = np.sort(rng.permutation(candidates)[:budget])
    labels = np.full(len(input_ids), IGNORE_INDEX, dtype=np.int64)
    labels[chosen] = input_ids[chosen]
    action = rng.random(len(chosen))
    replacements = regular_ids[rng.integers(len(regular_ids), size=len(chosen))]
    input_ids[chosen[action < 0.8]] = mask_id
    random_slots = action >= 0.9
    input_ids[chosen[random_slots]] = replacements[random_slots]
    return labels
