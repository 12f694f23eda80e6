"""You et al. (2020)'s early-bird rule recomputed from a run's search/mask_history.json, for the recipes' tests.

Written from the rule, not from ``tickets.distance``: keep-masks rebuilt from each recorded ticket's kept indices,
the normalised Hamming distance of the newest mask to each of the previous ``window - 1``, for heads and for FFN
neurons; the detector fires at the first record where all of them are strictly below ``eps``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _mask(kept: list[list[int]], sizes: list[int]) -> np.ndarray:
    return np.concatenate([np.isin(np.arange(size), indices) for indices, size in zip(kept, sizes)])


def recorded_masks(run: Path) -> tuple[list[int], list[tuple[np.ndarray, np.ndarray]]]:
    """(steps, [(head mask, FFN mask)]) of every ticket the search recorded."""
    history = json.loads((run / "search" / "mask_history.json").read_text())
    masks = []
    for ticket in history["tickets"]:
        geometry = ticket["source_geometry"]
        masks.append((_mask(ticket["heads_kept"], geometry["heads_per_layer"]),
                      _mask(ticket["ffn_kept"], geometry["ffn_per_layer"])))
    return history["steps"], masks


def window_distances(masks: list[tuple[np.ndarray, np.ndarray]], window: int) -> list[tuple[float, float] | None]:
    """Per record: the largest (head, FFN) distance to the previous ``window - 1`` masks; None before it fills."""
    worst: list[tuple[float, float] | None] = []
    for index, (heads, ffn) in enumerate(masks):
        if index < window - 1:
            worst.append(None)
            continue
        earlier = masks[index - window + 1:index]
        worst.append((max(float(np.mean(heads != h)) for h, _ in earlier),
                      max(float(np.mean(ffn != f)) for _, f in earlier)))
    return worst


def first_converged_step(run: Path, window: int = 5, eps: float = 0.1) -> int | None:
    """The step the early-bird detector must fire at (None: it must not fire), from the recorded masks alone."""
    steps, masks = recorded_masks(run)
    for step, worst in zip(steps, window_distances(masks, window)):
        if worst is not None and worst[0] < eps and worst[1] < eps:
            return step
    return None
