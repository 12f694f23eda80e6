"""Fine-tuning batches (global batches split over ranks, independent of the number of ranks), prediction, scoring.

The training step itself is the backend's (``train.stage.Stage``), shared with pre-training.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from earlybert_pretrain.errors import ConfigError
from earlybert_pretrain.finetune.features import pad_batch
from earlybert_pretrain.finetune.metrics import classification_scores, squad_scores
from earlybert_pretrain.finetune.squad import SquadSettings, extract_answers
from earlybert_pretrain.finetune.tasks import TaskSpec
from earlybert_pretrain.train import distributed
from earlybert_pretrain.train.engine import evaluation_autocast

# Batch fields each head takes as its training targets.
_TARGETS = {"squad": ("start_position", "end_position")}
_TARGET_ARGS = {"label": "labels", "start_position": "start_positions", "end_position": "end_positions"}


class GlobalBatchSampler:
    """This rank's share of every global batch: an epoch's permutation comes from (seed, epoch) alone and global
    batch g is its slice [g*B, (g+1)*B), cut into equal per-rank parts. So the batches, and the averaged gradient,
    do not depend on the number of ranks. A short last batch is padded by wrapping round so every rank steps."""

    def __init__(self, num_examples: int, global_batch: int, rank: int, world_size: int, seed: int):
        if global_batch % world_size:
            raise ConfigError(f"batch_size {global_batch} must be divisible by the number of ranks ({world_size})")
        self.num_examples, self.global_batch, self.rank, self.world_size = num_examples, global_batch, rank, world_size
        self.per_rank = global_batch // world_size
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_examples / self.global_batch)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for start in range(0, self.num_examples, self.global_batch):
            batch = order[start:start + self.global_batch].tolist()
            if len(batch) < self.world_size:  # too few to give every rank one: wrap round
                batch = (batch * self.world_size)[:self.world_size]
            share = math.ceil(len(batch) / self.world_size)
            yield (batch * 2)[self.rank * share:(self.rank + 1) * share]


@dataclass
class TrainBatches:
    """Global batches for one rank, epoch after epoch."""

    loader: DataLoader
    sampler: GlobalBatchSampler

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sampler)

    def epoch(self, epoch: int) -> Iterator[dict]:
        self.sampler.set_epoch(epoch)
        yield from self.loader

    def forever(self) -> Iterator[dict]:
        epoch = 0
        while True:
            yield from self.epoch(epoch)
            epoch += 1


def train_batches(features: datasets.Dataset, batch_size: int, rank: int, world_size: int, seed: int,
                  pad_token_id: int) -> TrainBatches:
    sampler = GlobalBatchSampler(len(features), batch_size, rank, world_size, seed)
    loader = DataLoader(features, batch_sampler=sampler, collate_fn=lambda rows: pad_batch(rows, pad_token_id))
    return TrainBatches(loader, sampler)


def model_inputs(batch: dict[str, torch.Tensor], task: TaskSpec, device: torch.device,
                 with_targets: bool = True) -> dict[str, torch.Tensor]:
    names = ["input_ids", "token_type_ids", "attention_mask"]
    if with_targets:
        names += _TARGETS.get(task.kind, ("label",))
    return {_TARGET_ARGS.get(name, name): batch[name].to(device, non_blocking=True) for name in names}


@torch.no_grad()
def predict(model: nn.Module, features: datasets.Dataset, task: TaskSpec, device: torch.device, batch_size: int,
            pad_token_id: int, precision: str = "fp32") -> list[np.ndarray]:
    """Logits per feature, in order: [num_labels] per example, or [length, 2] per SQuAD window. Under the training
    precision (bf16/fp16 autocast, logits returned in fp32), each rank scoring a contiguous share of the features;
    every rank gets all of them, so the scores are those of one process."""
    was_training = model.training
    model.eval()
    share = math.ceil(len(features) / distributed.world_size())
    start = min(len(features), distributed.rank() * share)
    mine = features.select(range(start, min(len(features), start + share)))
    loader = DataLoader(mine, batch_size=batch_size, collate_fn=lambda rows: pad_batch(rows, pad_token_id))
    outputs = []
    for batch in loader:
        inputs = model_inputs(batch, task, device, with_targets=False)
        with evaluation_autocast(precision, device):
            logits = model(**inputs).logits.float().cpu().numpy()
        if task.kind == "squad":
            lengths = batch["attention_mask"].sum(dim=1).tolist()
            outputs.extend(row[:length] for row, length in zip(logits, lengths))
        else:
            outputs.extend(logits)
    model.train(was_training)
    return [row for rank_outputs in distributed.from_every_rank(outputs) for row in rank_outputs]


def score(task: TaskSpec, examples: datasets.Dataset, features: datasets.Dataset, logits: list[np.ndarray],
          squad_settings: SquadSettings | None = None) -> dict[str, float]:
    """The task's metrics (percent) for one evaluation split."""
    if task.kind == "squad":
        start_logits = [row[:, 0] for row in logits]
        end_logits = [row[:, 1] for row in logits]
        answers = extract_answers(examples, features, start_logits, end_logits, squad_settings)
        references = {example_id: gold["text"]
                      for example_id, gold in zip(list(examples["id"]), list(examples["answers"]))}
        return squad_scores(answers, references)
    stacked = np.stack(logits)
    predictions = stacked[:, 0] if task.kind == "regression" else stacked.argmax(axis=1)
    return classification_scores(task.metric_names, predictions, np.asarray(list(features["label"])))
