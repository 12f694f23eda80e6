"""EarlyBERT config for transformers: a BertConfig plus the per-layer geometry of a pruned ticket.

Shipped inside a "compact" EarlyBERT export (depends on transformers only): ``heads_per_layer[i]`` attention heads of
size hidden_size // num_attention_heads and ``ffn_per_layer[i]`` FFN neurons in layer i.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import BertConfig


@strict
class EarlyBertConfig(BertConfig):
    model_type = "earlybert"
    heads_per_layer: list[int] | None = None
    ffn_per_layer: list[int] | None = None

    def __post_init__(self, **kwargs):
        layers = self.num_hidden_layers
        if self.heads_per_layer is None:
            self.heads_per_layer = [self.num_attention_heads] * layers
        if self.ffn_per_layer is None:
            self.ffn_per_layer = [self.intermediate_size] * layers
        for name in ("heads_per_layer", "ffn_per_layer"):
            values = getattr(self, name)
            if len(values) != layers or min(values) < 1:
                raise ValueError(f"EarlyBertConfig.{name}={values}: expected {layers} positive entries, one per layer")
        if max(self.heads_per_layer) > self.num_attention_heads:
            raise ValueError(f"EarlyBertConfig.heads_per_layer={self.heads_per_layer}: at most num_attention_heads "
                             f"({self.num_attention_heads}) per layer")
        super().__post_init__(**kwargs)


__all__ = ["EarlyBertConfig"]
