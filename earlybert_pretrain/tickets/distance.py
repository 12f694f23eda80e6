"""Mask distances between tickets and the early-bird stopping rule (paper Sec. 3.3).

The distance between two tickets is the normalised Hamming distance between their binary keep-masks: the fraction
of heads (or FFN neurons) kept by one ticket and pruned by the other. "combined" is the mean of the head and FFN
distances, each part weighted equally: over one concatenated mask the FFN neurons (36,864 in BERT-base) would drown
the 144 heads. The early-bird rule is You et al. (2020)'s: stop once the newest mask is within ``eps`` of each of the
previous ``window - 1`` masks, here for heads and FFN separately, both required.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import numpy as np

from earlybert_pretrain.errors import ConfigError, TicketError

if TYPE_CHECKING:
    from earlybert_pretrain.tickets.ticket import Ticket

DISTANCE_KINDS = ("head", "ffn", "combined")


def masks_distance(a_masks: tuple[np.ndarray, np.ndarray],
                   b_masks: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    head = float(np.mean(a_masks[0] != b_masks[0]))
    ffn = float(np.mean(a_masks[1] != b_masks[1]))
    return {"head": head, "ffn": ffn, "combined": (head + ffn) / 2}


def check_same_geometry(a: Ticket, b: Ticket) -> None:
    for name in ("heads_per_layer", "ffn_per_layer"):
        if a.source_geometry[name] != b.source_geometry[name]:
            raise TicketError(f"mask_distance: the tickets were drawn from different geometries ({name} "
                             f"{a.source_geometry[name]} vs {b.source_geometry[name]})")


def mask_distance(a: Ticket, b: Ticket) -> dict[str, float]:
    """Normalised Hamming distances ``{"head", "ffn", "combined"}`` in [0, 1] between two tickets' masks."""
    check_same_geometry(a, b)
    return masks_distance(a.masks(), b.masks())


class EarlyBirdDetector:
    """Feed it a ticket every K search steps; ``update`` returns True once the masks have converged.

    It fires when the newest mask is within ``eps`` (strictly below, as You et al.) of each of the previous
    ``window - 1`` masks, for heads and for FFN neurons. ``distances`` holds, per update after the first, the
    largest head / FFN distance to the earlier masks in the window. ``fired`` stays True once set. To resume,
    replay the recorded tickets (e.g. a loaded ``MaskHistory``) through ``update``.
    """

    def __init__(self, window: int = 5, eps: float = 0.1):
        if int(window) != window or window < 2:
            raise ConfigError(f"EarlyBirdDetector window must be an integer >= 2, got {window}")
        if not 0.0 < eps <= 1.0:
            raise ConfigError(f"EarlyBirdDetector eps must be in (0, 1], got {eps}")
        self.window, self.eps = int(window), float(eps)
        self._earlier: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=self.window - 1)
        self._first: Ticket | None = None
        self.distances: list[dict[str, float]] = []
        self.fired = False
        self.fired_at_update: int | None = None  # 0-based index of the update that first fired
        self.updates = 0

    def update(self, ticket: Ticket) -> bool:
        if self._first is None:
            self._first = ticket
        check_same_geometry(self._first, ticket)
        newest = ticket.masks()
        earlier = list(self._earlier)
        self._earlier.append(newest)
        self.updates += 1
        if not earlier:
            return False
        gaps = [masks_distance(newest, mask) for mask in earlier]
        worst = {kind: max(gap[kind] for gap in gaps) for kind in ("head", "ffn")}
        self.distances.append(worst)
        converged = len(earlier) == self.window - 1 and worst["head"] < self.eps and worst["ffn"] < self.eps
        if converged and not self.fired:
            self.fired, self.fired_at_update = True, self.updates - 1
        return converged
