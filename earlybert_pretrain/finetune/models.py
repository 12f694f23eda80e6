"""Fine-tuning heads on our BERT, with transformers' parameter names (``classifier.*``, ``qa_outputs.*``).

Both load any HF-format BERT folder through ``hf.load_pretrained``: a bare BertModel checkpoint, our pre-training
output (its ``cls.*`` heads are dropped with a warning) or a fine-tuned folder of the same class. The number of
labels is stored in config.json (``num_labels``, as transformers does), so a saved classifier reloads by itself.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from earlybert_pretrain.common.files import atomic_write_json
from earlybert_pretrain.model.bert import BertConfig, BertModel, BertPreTrainedModel
from earlybert_pretrain.model.hf import CONFIG_NAME, load_pretrained, save_pretrained


@dataclass
class HeadOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # classification: [B, num_labels]; QA: [B, T, 2] (start, end)


class BertForSequenceClassification(BertPreTrainedModel):
    """Pooled [CLS] -> dropout -> linear; cross-entropy, or MSE when ``num_labels == 1`` (STS-B regression)."""

    def __init__(self, config: BertConfig, num_labels: int = 2):
        super().__init__()
        self.config = config
        self.num_labels = num_labels
        self.bert = BertModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        self.init_weights()

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> HeadOutput:
        _, pooled = self.bert(input_ids, token_type_ids, attention_mask)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.float().view(-1), labels.float().view(-1))
            else:
                loss = F.cross_entropy(logits.float(), labels.view(-1))
        return HeadOutput(loss, logits)

    def head_config(self) -> dict:
        return {"num_labels": self.num_labels}

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, num_labels: int | None = None,
                        **overrides) -> BertForSequenceClassification:
        """``num_labels`` defaults to the folder's own (a fine-tuned classifier) or 2."""
        if num_labels is None:
            num_labels = int(json.loads((Path(folder) / CONFIG_NAME).read_text()).get("num_labels", 2))
        return load_pretrained(functools.partial(cls, num_labels=num_labels), folder, **overrides)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        save_with_head_config(self, folder)


class BertForQuestionAnswering(BertPreTrainedModel):
    """Token-level start/end logits; no pooler (as transformers' BertForQuestionAnswering)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooler=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.init_weights()

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, start_positions: torch.Tensor | None = None,
                end_positions: torch.Tensor | None = None) -> HeadOutput:
        sequence_output, _ = self.bert(input_ids, token_type_ids, attention_mask)
        logits = self.qa_outputs(sequence_output)
        loss = None
        if start_positions is not None and end_positions is not None:
            start_logits, end_logits = answer_logits(logits, attention_mask)
            loss = (F.cross_entropy(start_logits, start_positions) + F.cross_entropy(end_logits, end_positions)) / 2
        return HeadOutput(loss, logits)

    def head_config(self) -> dict:
        return {}

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **overrides) -> BertForQuestionAnswering:
        return load_pretrained(cls, folder, **overrides)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        save_with_head_config(self, folder)


def answer_logits(logits: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 start and end logits [B, T] with padding positions at -inf: an answer never starts or ends on padding, and
    padding takes no share of the softmax. Without this the loss depends on the kernel path: padded, a padding
    position's logit comes from its (unused) hidden state; unpadded, that hidden state is zero and the logit is the
    ``qa_outputs`` bias."""
    start_logits, end_logits = logits.float().unbind(dim=-1)
    if attention_mask is None:
        return start_logits, end_logits
    padding = attention_mask == 0
    return start_logits.masked_fill(padding, float("-inf")), end_logits.masked_fill(padding, float("-inf"))


def save_with_head_config(model: BertForSequenceClassification | BertForQuestionAnswering,
                          folder: str | os.PathLike) -> None:
    """``hf.save_pretrained`` plus the head's settings (``num_labels``) in config.json."""
    save_pretrained(model, folder)
    extra = model.head_config()
    if extra:
        path = Path(folder) / CONFIG_NAME
        atomic_write_json(path, {**json.loads(path.read_text()), **extra})


def build_task_model(kind: str, folder: str | os.PathLike, num_labels: int) -> BertPreTrainedModel:
    """The head a task needs (``kind`` from the task registry), loaded from an HF-format BERT folder."""
    if kind == "squad":
        return BertForQuestionAnswering.from_pretrained(folder)
    return BertForSequenceClassification.from_pretrained(folder, num_labels=num_labels)
