"""EarlyBERT's search as one component both recipes use (paper Sec. 3.2, 4.2, 4.3).

``SlimmingSearch`` is a training-stage hook: it adds λ‖c‖₁ to the loss (Eq. 4), draws a ticket every
``record_every`` steps from the coefficients every rank agrees on (fp32 copies, gathered under any sharding: the
coefficients are the optimizer's fp32 values in every precision mode, and each ticket records that dtype), keeps
the mask history and the early-bird detector (You et al. 2020), stops the stage when the detector fires in early-bird
mode, and carries its state through checkpoints. ``finish()`` returns the ticket every rank drew, checked to be the
one rank 0 drew.

It knows the stage only through three calls: ``stage.module``, ``stage.full_precision_copies(params)`` and
``stage.check_ranks_agree(tensor, what)`` (see ``train/stage.py``), so tickets/ never imports the training backend.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from earlybert_pretrain.config import SearchConfig
from earlybert_pretrain.model.bert import BertConfig
from earlybert_pretrain.tickets.distance import EarlyBirdDetector
from earlybert_pretrain.tickets.draw import draw_ticket, l1_penalty
from earlybert_pretrain.tickets.history import MaskHistory
from earlybert_pretrain.tickets.ticket import Ticket

logger = logging.getLogger(__name__)


@dataclass
class SearchOutcome:
    ticket: Ticket  # the ticket every rank agrees on, drawn at the search's last step
    history: MaskHistory
    steps: int
    planned_steps: int
    early_bird_fired_at: int | None  # the step the detector fired at; None if it did not (or was not asked)
    early_bird_update: int | None  # the same, as the index of the detector update
    digests_by_rank: list[str]
    warnings: list[str] = field(default_factory=list)


class SlimmingSearch:
    """A stage hook (see ``train.stage.StageHook``): L1 term, periodic draws, early-bird stop, resumable state."""

    def __init__(self, settings: SearchConfig, heads_to_prune: float, planned_steps: int, config: BertConfig,
                 tensorboard=None):
        self.settings, self.heads_to_prune, self.planned_steps = settings, heads_to_prune, planned_steps
        self.config, self.tensorboard = config, tensorboard
        self.history = MaskHistory()
        self.detector = EarlyBirdDetector(settings.early_bird_window, settings.early_bird_eps)
        self.fired_at: int | None = None

    def extra_loss(self, module) -> torch.Tensor:
        return l1_penalty(module, self.settings.lam, self.settings.lam_ffn)

    def draw(self, stage, step: int) -> Ticket:
        """A ticket from the fp32 coefficients the optimizer holds, after checking every rank holds the same."""
        kinds_layers, params = [], []
        for kind, layer, coefficients in stage.module.slimming_coefficients():
            kinds_layers.append((kind, layer))
            params.append(coefficients)
        copies = stage.full_precision_copies(params)
        stage.check_ranks_agree(torch.cat(copies), "the slimming coefficients")
        gathered: dict[str, list[torch.Tensor]] = {"head": [], "ffn": []}
        for (kind, _), values in sorted(zip(kinds_layers, copies), key=lambda item: item[0][1]):
            gathered[kind].append(values)
        s = self.settings
        return draw_ticket(gathered, self.heads_to_prune, s.ffn_ratio, s.ffn_scope, config=self.config, step=step,
                           lam_heads=s.lam, lam_ffn=s.lam_ffn, ffn_multiple_of=s.ffn_multiple_of)

    def after_step(self, stage, step: int) -> bool:
        if step % self.settings.record_every and step != self.planned_steps:
            return False
        ticket = self.draw(stage, step)
        self.history.add(step, ticket)
        converged = self.detector.update(ticket)
        if self.tensorboard is not None:
            if self.detector.distances:
                self.tensorboard.scalars(self.detector.distances[-1], step, prefix="search/mask_distance_")
            for kind, layer, coefficients in stage.module.slimming_coefficients():
                self.tensorboard.histogram(f"search/{kind}_coefficients/layer{layer}", coefficients, step)
        if converged and self.settings.stop == "early-bird" and self.fired_at is None:
            self.fired_at = step
            logger.info("early-bird ticket found at step %d; search stopped", step)
            return True
        return False

    def state_dict(self) -> dict:
        return self.history.to_dict()

    def load_state_dict(self, state: dict) -> None:
        self.history = MaskHistory.from_dict(state)
        for step, ticket in zip(self.history.steps, self.history.tickets):  # the detector is a function of the masks
            if self.detector.update(ticket) and self.settings.stop == "early-bird" and self.fired_at is None:
                self.fired_at = step

    def finish(self, steps: int) -> SearchOutcome:
        """The last recorded ticket, which every rank must have drawn identically (rank 0's copy is broadcast)."""
        ticket = self.history.tickets[-1]
        payload = [ticket.to_dict()]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(payload, src=0)
            digests = [None] * dist.get_world_size()
            dist.all_gather_object(digests, ticket.digest())
        else:
            digests = [ticket.digest()]
        agreed = Ticket.from_dict(payload[0], where="ticket broadcast from rank 0")
        if set(digests) != {agreed.digest()}:
            raise RuntimeError(f"ranks drew different tickets (digests {digests}); rank 0 drew {agreed.digest()}")
        warnings = []
        if self.settings.stop == "early-bird" and self.fired_at is None:
            warnings.append(f"the early-bird detector did not fire within {self.planned_steps} search steps; drew "
                            f"the ticket at step {steps}")
            logger.warning(warnings[-1])
        return SearchOutcome(agreed, self.history, steps, self.planned_steps, self.fired_at,
                             self.detector.fired_at_update, digests, warnings)
