"""EarlyBERT models for transformers: stock BERT whose layers have their own head count and FFN width.

Shipped inside a "compact" EarlyBERT export (depends on torch and transformers only). Each class is transformers'
Bert class with the encoder's projections rebuilt at the per-layer sizes of ``EarlyBertConfig`` before the weights
are loaded: Q/K/V hold ``heads_per_layer[i]`` heads (head size unchanged) and W_O takes them, W1 / W2 hold
``ffn_per_layer[i]`` neurons. Attention reshapes by head size, so the rest of transformers' code runs unchanged.
"""

from __future__ import annotations

from torch import nn
from transformers import (
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
)

from .configuration_earlybert import EarlyBertConfig


def resize_encoder(encoder: nn.Module, config: EarlyBertConfig) -> None:
    """Rebuild every layer's attention and FFN projections at that layer's size."""
    hidden = config.hidden_size
    head_size = hidden // config.num_attention_heads
    for layer, heads, width in zip(encoder.layer, config.heads_per_layer, config.ffn_per_layer):
        attention = layer.attention.self
        attention.num_attention_heads = heads
        attention.all_head_size = heads * head_size
        for name in ("query", "key", "value"):
            setattr(attention, name, nn.Linear(hidden, heads * head_size))
        layer.attention.output.dense = nn.Linear(heads * head_size, hidden)
        layer.intermediate.dense = nn.Linear(hidden, width)
        layer.output.dense = nn.Linear(width, hidden)


class EarlyBertModel(BertModel):
    config_class = EarlyBertConfig

    def __init__(self, config: EarlyBertConfig, add_pooling_layer: bool = True):
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        resize_encoder(self.encoder, config)
        self.post_init()


class EarlyBertForPreTraining(BertForPreTraining):
    config_class = EarlyBertConfig

    def __init__(self, config: EarlyBertConfig):
        super().__init__(config)
        resize_encoder(self.bert.encoder, config)
        self.post_init()


class EarlyBertForSequenceClassification(BertForSequenceClassification):
    config_class = EarlyBertConfig

    def __init__(self, config: EarlyBertConfig):
        super().__init__(config)
        resize_encoder(self.bert.encoder, config)
        self.post_init()


class EarlyBertForQuestionAnswering(BertForQuestionAnswering):
    config_class = EarlyBertConfig

    def __init__(self, config: EarlyBertConfig):
        super().__init__(config)
        resize_encoder(self.bert.encoder, config)
        self.post_init()


__all__ = ["EarlyBertForPreTraining", "EarlyBertForQuestionAnswering", "EarlyBertForSequenceClassification",
           "EarlyBertModel"]
