"""The mask history of a search: every recorded ticket by step, their pairwise distances, the Figure-1 heatmap."""

from __future__ import annotations

import json
import os

import numpy as np

from earlybert_pretrain.common.files import atomic_path, atomic_write_text, read_json
from earlybert_pretrain.errors import TicketError
from earlybert_pretrain.tickets.distance import DISTANCE_KINDS, check_same_geometry, masks_distance
from earlybert_pretrain.tickets.ticket import Ticket

HISTORY_FORMAT = "earlybert-mask-history"
HISTORY_VERSION = 1


class MaskHistory:
    """Every ticket recorded during a search, by step; the pairwise distances and their Figure-1 heatmap."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.tickets: list[Ticket] = []

    def __len__(self) -> int:
        return len(self.steps)

    def add(self, step: int, ticket: Ticket) -> None:
        """Record ``ticket`` at ``step``; entries at or after ``step`` are dropped first, so a resumed search that
        re-records steps after its checkpoint leaves one entry per step."""
        if self.tickets:
            check_same_geometry(self.tickets[0], ticket)
        keep = sum(1 for recorded in self.steps if recorded < step)
        del self.steps[keep:], self.tickets[keep:]
        self.steps.append(int(step))
        self.tickets.append(ticket)

    def distance_matrix(self, kind: str = "combined") -> np.ndarray:
        """[n, n] float array of ``mask_distance(...)[kind]`` between every pair of recorded tickets."""
        if kind not in DISTANCE_KINDS:
            raise ValueError(f"distance kind {kind!r}, expected one of {DISTANCE_KINDS}")
        masks = [ticket.masks() for ticket in self.tickets]
        matrix = np.zeros((len(masks), len(masks)))
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                matrix[i, j] = matrix[j, i] = masks_distance(masks[i], masks[j])[kind]
        return matrix

    def _figure(self, kinds: tuple[str, ...]):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        if not self.tickets:
            raise ValueError("MaskHistory is empty: record tickets with add(step, ticket) before plotting")
        figure = Figure(figsize=(4.2 * len(kinds), 3.6), dpi=100)
        FigureCanvasAgg(figure)
        titles = {"head": "attention heads", "ffn": "FFN neurons", "combined": "heads and FFN"}
        for position, kind in enumerate(kinds, start=1):
            axes = figure.add_subplot(1, len(kinds), position)
            # As Figure 1: darker = smaller distance; axes are training steps.
            image = axes.imshow(self.distance_matrix(kind), cmap="viridis", vmin=0.0, origin="upper")
            ticks = list(range(0, len(self.steps), -(-len(self.steps) // 6)))  # at most 6 labels per axis
            axes.set_xticks(ticks, [str(self.steps[i]) for i in ticks], rotation=45)
            axes.set_yticks(ticks, [str(self.steps[i]) for i in ticks])
            axes.set_xlabel("training step")
            axes.set_ylabel("training step")
            axes.set_title(f"mask distance, {titles[kind]}", fontsize=10)
            figure.colorbar(image, ax=axes)
        figure.tight_layout()
        return figure

    def save_heatmap(self, path: str | os.PathLike, kinds: tuple[str, ...] = ("head", "ffn")) -> None:
        """Write the pairwise-distance heatmap(s) as a PNG, one panel per kind (Figure 1 (a)/(b))."""
        figure = self._figure(kinds)
        with atomic_path(path) as temp:
            figure.savefig(temp, format="png")

    def heatmap_image(self, kinds: tuple[str, ...] = ("head", "ffn")) -> np.ndarray:
        """The same heatmap as a uint8 [H, W, 3] array, for ``TensorBoardLogger.image``."""
        figure = self._figure(kinds)
        figure.canvas.draw()
        return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()

    def to_dict(self) -> dict:
        """Steps and full tickets; saved without indentation (a BERT-base ticket lists ~25k neuron indices)."""
        return {"format": HISTORY_FORMAT, "version": HISTORY_VERSION, "steps": self.steps,
                "tickets": [ticket.to_dict() for ticket in self.tickets]}

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), separators=(",", ":")) + "\n")

    @classmethod
    def from_dict(cls, values: object, where: str = "mask history") -> MaskHistory:
        if not isinstance(values, dict) or values.get("format") != HISTORY_FORMAT:
            raise TicketError(f"{where}: not a mask history (expected \"format\": \"{HISTORY_FORMAT}\")")
        if values.get("version") != HISTORY_VERSION:
            raise TicketError(f"{where}: mask history version {values.get('version')!r}, expected {HISTORY_VERSION}")
        steps, tickets = values.get("steps"), values.get("tickets")
        if not isinstance(steps, list) or not isinstance(tickets, list) or len(steps) != len(tickets):
            raise TicketError(f"{where}: expected equally long 'steps' and 'tickets' lists")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise TicketError(f"{where}: steps are not strictly increasing")
        history = cls()
        for index, (step, ticket) in enumerate(zip(steps, tickets)):
            history.add(step, Ticket.from_dict(ticket, where=f"{where}: tickets[{index}]"))
        return history

    @classmethod
    def load(cls, path: str | os.PathLike) -> MaskHistory:
        return cls.from_dict(read_json(path, "mask history", TicketError), where=str(path))

