"""EarlyBERT's search stage for fine-tuning (Sec. 3.2, 4.2): train a copy of the pre-trained model with slimming
coefficients under an L1 penalty, recording a drawn ticket every few steps, then draw the ticket to prune.

The copy is thrown away afterwards: the fine-tuning stage rewinds to the pre-trained weights and prunes those.
The search runs at the dense learning rate held constant, so its first steps already move the coefficients.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import datasets
from torch import nn

from earlybert_pretrain.finetune.config import FinetuneSearchConfig
from earlybert_pretrain.finetune.loop import make_optimizer, model_inputs, timed_step, train_batches
from earlybert_pretrain.finetune.runtime import Runtime, unwrap
from earlybert_pretrain.finetune.tasks import TaskSpec
from earlybert_pretrain.tickets.distance import EarlyBirdDetector
from earlybert_pretrain.tickets.draw import draw_ticket, l1_penalty
from earlybert_pretrain.tickets.history import MaskHistory
from earlybert_pretrain.tickets.ticket import Ticket
from earlybert_pretrain.train.telemetry import StepTimer, TensorBoardLogger

logger = logging.getLogger(__name__)


@dataclass
class SearchResult:
    ticket: Ticket
    history: MaskHistory
    timer: StepTimer
    steps: int
    planned_steps: int
    early_bird_fired_at: int | None  # the step the detector fired at; None if it did not (or was not asked)
    warnings: list[str]
    losses: list[float]  # per step: task loss + L1 term


def planned_search_steps(config: FinetuneSearchConfig, steps_per_epoch: int) -> int:
    """``steps`` when given, else ``epochs`` of an epoch (the paper's 0.2), at least one step."""
    return config.steps if config.steps > 0 else max(1, math.ceil(config.epochs * steps_per_epoch))


def run_search(model: nn.Module, task: TaskSpec, features: datasets.Dataset, config: FinetuneSearchConfig,
               heads_to_prune: float, lr: float, batch_size: int, seed: int, weight_decay: float, adam_eps: float,
               grad_clip: float, runtime: Runtime, tensorboard: TensorBoardLogger, pad_token_id: int) -> SearchResult:
    searched = copy.deepcopy(unwrap(model))
    searched.add_slimming_coefficients()
    wrapped = runtime.wrap(searched)
    batches = train_batches(features, batch_size, runtime, seed, pad_token_id)
    planned = planned_search_steps(config, batches.steps_per_epoch)
    warnings = []
    if planned < config.warn_below_steps and config.stop == "fixed":
        warnings.append(
            f"the search is only {planned} steps (an epoch is {batches.steps_per_epoch} steps); coefficient "
            f"rankings may not have settled below ~{config.warn_below_steps} steps: set search.steps or "
            "search.stop=early-bird")
        logger.warning(warnings[-1])
    optimizer = make_optimizer(wrapped, lr, weight_decay, adam_eps)
    timer = StepTimer(runtime.device)
    history = MaskHistory()
    detector = EarlyBirdDetector(config.early_bird_window, config.early_bird_eps)
    wrapped.train()

    def draw(step: int) -> Ticket:
        return draw_ticket(searched, heads_to_prune, config.ffn_ratio, config.ffn_scope, step=step,
                           lam_heads=config.lam, ffn_multiple_of=config.ffn_multiple_of)

    fired_at = None
    step, step_losses = 0, []
    for batch in batches.forever():
        inputs = model_inputs(batch, task, runtime.device)
        losses = timed_step(wrapped, inputs, optimizer, None, runtime, timer, grad_clip,
                            extra_loss=lambda: l1_penalty(searched, config.lam))
        step += 1
        step_losses.append(losses["loss"])
        tensorboard.scalars(losses, step, prefix="search/")
        if step % config.record_every == 0 or step == planned:
            ticket = draw(step)
            history.add(step, ticket)
            if detector.update(ticket) and config.stop == "early-bird":
                fired_at = step
                break
        if step >= planned:
            break
    if config.stop == "early-bird" and fired_at is None:
        warnings.append(f"the early-bird detector did not fire within {planned} search steps; drew the ticket at "
                        f"step {step}")
        logger.warning(warnings[-1])
    # The last step is always recorded (the loop leaves right after a record or at ``planned``).
    return SearchResult(history.tickets[-1], history, timer, step, planned, fired_at, warnings, step_losses)
