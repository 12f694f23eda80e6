"""Validation during pre-training: MLM loss, MLM accuracy and NSP accuracy on the held-out split (issue 23; the
paper's claim is quality per unit of time, Sec. 4, Tables 2-3 and 7).

The examples are fixed: ``eval.batches`` micro-batches per sequence length of the run (phase 1's and phase 2's), built
by the training rules (``batches.PretrainingBatches``) from the validation split with ``eval.seed``, not the run's
seeds, so dense, EarlyBERT, random and reduced runs are scored on the same masked examples. Example ``g`` of a
length's set is scored by rank ``g % world_size``; each rank sums its share (cross-entropy summed in fp32, totals
in float64) and the ranks' sums are added in rank order, so 2 ranks score what 1 rank does. The headline numbers
pool every length (masked positions and sequences summed); each length's own are kept beside them.

The model is scored in eval mode (no dropout: no training random numbers are drawn) under the training precision's
autocast, between optimizer steps: outside the Sec. 4.1 step timer, with its own time recorded. A ``ValidationHook``
keeps its records in the stage's checkpoints, so a resumed stage repeats no evaluation and loses none.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_prep.indexed import load_manifest
from earlybert_pretrain.common.tokens import IGNORE_INDEX
from earlybert_pretrain.config import PretrainConfig
from earlybert_pretrain.pretrain.batches import PretrainingBatches, ShardedCorpus
from earlybert_pretrain.train.distributed import from_every_rank
from earlybert_pretrain.train.engine import AUTOCAST_DTYPES
from earlybert_pretrain.train.stage import Runtime, Stage, StageHook
from earlybert_pretrain.train.telemetry import TensorBoardLogger

logger = logging.getLogger(__name__)

SPLIT = "validation"
# Per-length sums: summed cross-entropy over masked positions, correct top-1 predictions, masked positions,
# correct NSP predictions, sequences.
SUMS = ("mlm_loss_sum", "mlm_correct", "masked", "nsp_correct", "sequences")
Batch = dict[str, torch.Tensor]


def batch_sums(module: nn.Module, batch: Batch) -> np.ndarray:
    """The SUMS of one micro-batch (already on the model's device), in float64."""
    output = module(**batch)
    targets = batch["labels"][batch["labels"] != IGNORE_INDEX]  # row-major, as the model orders its masked logits
    logits = output.prediction_logits.float()
    nsp = output.seq_relationship_logits.float().argmax(-1) == batch["next_sentence_label"].view(-1)
    values = (F.cross_entropy(logits, targets, reduction="sum"), (logits.argmax(-1) == targets).sum(),
              targets.numel(), nsp.sum(), nsp.numel())
    return np.array([float(value) for value in values], dtype=np.float64)


def metrics(sums: np.ndarray) -> dict[str, float | int]:
    loss_sum, correct, masked, nsp_correct, sequences = (float(value) for value in sums)
    return {"mlm_loss": loss_sum / masked if masked else float("nan"),
            "mlm_accuracy": correct / masked if masked else float("nan"),
            "nsp_accuracy": nsp_correct / sequences if sequences else float("nan"),
            "masked": int(masked), "sequences": int(sequences)}


@dataclass(frozen=True)
class EvalLength:
    seq_len: int
    max_predictions: int
    micro_batch_size: int


class Validation:
    """The fixed validation micro-batches this rank scores, per sequence length, and the scoring."""

    def __init__(self, batches: dict[int, list[Batch]], runtime: Runtime) -> None:
        self.batches, self.runtime = batches, runtime

    @classmethod
    def from_corpus(cls, corpus: ShardedCorpus, lengths: Sequence[EvalLength], cfg: PretrainConfig,
                    runtime: Runtime) -> Validation:
        """``cfg.eval.batches`` micro-batches per length, masked with ``cfg.eval.seed``; this rank's share."""
        batches, data = {}, cfg.data
        for length in lengths:
            # No plan cache: the run's plans/ folder names plans by (length, seed), not by split.
            stream = PretrainingBatches(corpus, length.seq_len, length.max_predictions, length.micro_batch_size,
                                        seed=cfg.eval.seed, masked_lm_prob=data.masked_lm_prob,
                                        short_seq_prob=data.short_seq_prob,
                                        whole_word_masking=data.whole_word_masking)
            mine = list(range(runtime.rank, cfg.eval.batches * length.micro_batch_size, runtime.world_size))
            batches[length.seq_len] = [stack([stream.example(g) for g in mine[start:start + length.micro_batch_size]])
                                       for start in range(0, len(mine), length.micro_batch_size)]
        return cls(batches, runtime)

    @classmethod
    def open(cls, cfg: PretrainConfig, runtime: Runtime) -> Validation | None:
        """The run's validation set, or None (said once) when the shards hold no validation split."""
        where = f"{cfg.data.shard_dir}/manifest.json"
        if not load_manifest(cfg.data.shard_dir)["splits"].get(SPLIT):
            if runtime.is_main:
                logger.warning("%s has no validation split: evaluation skipped (earlybert-prep "
                               "--validation-fraction > 0 makes one)", where)
            return None
        corpus = ShardedCorpus(cfg.data.shard_dir, SPLIT, verify=cfg.data.verify)
        if corpus.doc_sentences.max(initial=0) < 2:  # an example pairs two sentences of one document
            if runtime.is_main:
                logger.warning("%s: no validation document has 2 sentences: evaluation skipped", where)
            return None
        lengths = {phase.seq_len: EvalLength(phase.seq_len, phase.max_predictions, phase.micro_batch_size)
                   for phase in (cfg.phase1, cfg.phase2)}
        return cls.from_corpus(corpus, list(lengths.values()), cfg, runtime)

    def local_sums(self, module: nn.Module) -> dict[int, np.ndarray]:
        """This rank's SUMS per sequence length: eval mode, no gradients, the training precision's autocast."""
        device, precision = self.runtime.device, self.runtime.precision
        autocast = (torch.autocast(device.type, dtype=getattr(torch, AUTOCAST_DTYPES[precision]))
                    if precision in AUTOCAST_DTYPES else contextlib.nullcontext())
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad(), autocast:
                return {seq_len: sum((batch_sums(module, {key: value.to(device) for key, value in batch.items()})
                                      for batch in batches), np.zeros(len(SUMS)))
                        for seq_len, batches in self.batches.items()}
        finally:
            module.train(was_training)

    def score(self, module: nn.Module) -> dict:
        """Every rank's sums added (in rank order): the headline metrics pooled over lengths, and per length."""
        by_rank = from_every_rank(self.local_sums(module))
        per_length = {seq_len: np.sum([sums[seq_len] for sums in by_rank], axis=0) for seq_len in by_rank[0]}
        return {**metrics(np.sum(list(per_length.values()), axis=0)),
                "by_seq_len": {str(seq_len): metrics(sums) for seq_len, sums in per_length.items()}}


def stack(rows: Iterable[dict[str, np.ndarray]]) -> Batch:
    rows = list(rows)
    return {key: torch.from_numpy(np.stack([row[key] for row in rows])) for key in rows[0]}


class ValidationHook(StageHook):
    """Scores the stage's model every ``every`` optimizer steps (0: never in between) and, through ``finish``, at
    its end; each record holds the step, the stage's Sec. 4.1 time then, the metrics and the evaluation's own time."""

    def __init__(self, validation: Validation, every: int, tensorboard: TensorBoardLogger, step_offset: int) -> None:
        self.validation, self.every, self.tensorboard = validation, every, tensorboard
        self.step_offset = step_offset  # the run's optimizer steps before this stage: TensorBoard's x axis
        self.records: list[dict] = []

    def after_step(self, stage: Stage, step: int) -> bool:
        if self.every and step % self.every == 0:
            self.evaluate(stage)
        return False

    def finish(self, stage: Stage) -> None:
        """The end-of-stage evaluation, unless the last step was just scored."""
        if not self.records or self.records[-1]["step"] != stage.step:
            self.evaluate(stage)

    def evaluate(self, stage: Stage) -> None:
        started = time.perf_counter()
        scores = self.validation.score(stage.module)
        record = {"step": stage.step, "train_seconds": stage.timer.total_seconds, **scores,
                  "eval_seconds": time.perf_counter() - started}
        self.records.append(record)
        self.tensorboard.scalars({name: scores[name] for name in ("mlm_loss", "mlm_accuracy", "nsp_accuracy")},
                                 self.step_offset + stage.step, prefix="validation/")
        if stage.runtime.is_main:
            logger.info("%s step %d validation: mlm loss %.4f  mlm accuracy %.4f  nsp accuracy %.4f  (%.1f s)",
                        stage.settings.name, stage.step, scores["mlm_loss"], scores["mlm_accuracy"],
                        scores["nsp_accuracy"], record["eval_seconds"])

    def add_to(self, record: dict) -> None:
        """Put every evaluation into the stage's progress ``record``, their summed time beside (not inside) its
        Sec. 4.1 time."""
        record["validation"] = list(self.records)
        record["timing"]["evaluation_seconds"] = sum(entry["eval_seconds"] for entry in self.records)

    def state_dict(self) -> dict:
        return {"records": list(self.records)}

    def load_state_dict(self, state: dict) -> None:
        self.records = list(state.get("records", []))
