"""BERT for pre-training (MLM + NSP) with per-layer geometry and EarlyBERT slimming coefficients.

The network is the original post-LN BERT, parameter for parameter the same as transformers' ``BertForPreTraining``
(same parameter names, so its state dict loads with ``load_state_dict``). Two things differ from a plain BERT:

* each layer has its own number of attention heads and FFN width (``heads_per_layer`` / ``ffn_per_layer``), which is
  what a drawn EarlyBERT ticket looks like after physical pruning (the head size stays hidden // num_attention_heads);
* with ``slimming=True`` every head's context output is multiplied by a learnable scalar before W_O (paper Eq. 2)
  and every FFN neuron's activation by another (Eq. 3); the search stage trains them under an L1 penalty.

Loading and saving HF-format folders lives in ``hf.py``. ``parameter_counts`` and ``flops_per_token`` account for
parameters and training FLOPs per component; the ticket report uses them to predict a pruned model's speed-up.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from earlybert_pretrain.common.tokens import IGNORE_INDEX
from earlybert_pretrain.errors import ConfigError
from earlybert_pretrain.model.unpad import Packing, sdpa_backend, varlen_attention, varlen_backend, worth_unpadding

# Max predictions per sequence over sequence length: 20/128 and 80/512 in the BERT recipe (Sec. 4.1 setting).
DEFAULT_MASKED_FRACTION = 20 / 128


@dataclass
class BertConfig:
    """BERT geometry and regularisation. Defaults are BERT-base (paper Sec. 4.1: 12 layers, 768 hidden, 12 heads)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    # Per-layer geometry; empty means uniform (num_attention_heads / intermediate_size in every layer).
    heads_per_layer: list[int] = field(default_factory=list)
    ffn_per_layer: list[int] = field(default_factory=list)
    # Learnable EarlyBERT slimming coefficients on heads and FFN neurons (paper Sec. 3.2, Eq. 2-3).
    slimming: bool = False
    # Use NVIDIA Apex FusedLayerNorm when it is installed and the model runs on CUDA (same parameters, same math).
    fused_layer_norm: bool = True
    # Run the per-token layers on the real tokens only (unpad.py): true, false, or auto (CUDA, >= 10% padding,
    # encoder not compiled).
    unpad: bool | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        if not self.heads_per_layer:
            self.heads_per_layer = [self.num_attention_heads] * self.num_hidden_layers
        if not self.ffn_per_layer:
            self.ffn_per_layer = [self.intermediate_size] * self.num_hidden_layers
        self.heads_per_layer = [int(h) for h in self.heads_per_layer]
        self.ffn_per_layer = [int(f) for f in self.ffn_per_layer]
        self.validate()

    def validate(self) -> None:
        """Raise one ConfigError naming the field and what was expected."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"BertConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"BertConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})")
        for name, values in (("heads_per_layer", self.heads_per_layer), ("ffn_per_layer", self.ffn_per_layer)):
            if len(values) != self.num_hidden_layers:
                raise ConfigError(
                    f"BertConfig.{name} has {len(values)} entries, expected one per layer "
                    f"(num_hidden_layers={self.num_hidden_layers})")
        for layer, heads in enumerate(self.heads_per_layer):
            if not 1 <= heads <= self.num_attention_heads:
                raise ConfigError(
                    f"BertConfig.heads_per_layer[{layer}] = {heads}, expected 1..num_attention_heads "
                    f"({self.num_attention_heads})")
        for layer, width in enumerate(self.ffn_per_layer):
            if width < 1:
                raise ConfigError(f"BertConfig.ffn_per_layer[{layer}] = {width}, expected >= 1")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise ConfigError(f"BertConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.unpad not in (True, False, "auto"):
            raise ConfigError(f"BertConfig.unpad must be true, false or 'auto', got {self.unpad!r}")

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> BertConfig:
        """Build from a dict such as an HF config.json; keys this class does not know are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_hf(cls, hf_config) -> BertConfig:
        """From a ``transformers.BertConfig`` (or anything with its attributes)."""
        act = getattr(hf_config, "hidden_act", "gelu")
        if act != "gelu":
            raise ConfigError(f"hidden_act={act!r} is not supported: this BERT uses the exact (erf) GELU, 'gelu'")
        return cls.from_dict(hf_config.to_dict())


@dataclass
class PreTrainingOutput:
    """``prediction_logits`` covers every position without labels, only the masked positions with labels."""

    loss: torch.Tensor | None
    mlm_loss: torch.Tensor | None
    nsp_loss: torch.Tensor | None
    prediction_logits: torch.Tensor
    seq_relationship_logits: torch.Tensor


def make_layer_norm(hidden_size: int, eps: float, fused: bool) -> nn.Module:
    """Apex FusedLayerNorm when asked for, installed and CUDA is present; else PyTorch's LayerNorm (same parameters).
    Either runs in fp32 under autocast (``_in_fp32``)."""
    kernel: type[nn.Module] = nn.LayerNorm
    if fused and torch.cuda.is_available():
        try:
            from apex.normalization import FusedLayerNorm
        except ImportError:
            pass
        else:
            kernel = FusedLayerNorm
    return _in_fp32(kernel)(hidden_size, eps=eps)


@functools.cache
def _in_fp32(kernel: type[nn.Module]) -> type[nn.Module]:
    """``kernel`` with autocast off and its input in the parameters' dtype, so under bf16/fp16 autocast (fp32
    parameters) its output and its parameters' gradients are fp32. Needed on every path: apex's FusedLayerNorm casts
    input, weight and bias to the autocast dtype (its ``_cast_if_autocast_enabled``), and CPU autocast runs torch's
    layer_norm in the input's dtype (CUDA autocast keeps it fp32). The residual stream and the LayerNorm weights are
    thus never rounded to half precision."""

    class InFp32(kernel):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            with torch.autocast(input.device.type, enabled=False):
                return super().forward(input.to(self.weight.dtype))

    InFp32.__name__ = InFp32.__qualname__ = f"Fp32{kernel.__name__}"  # names the kernel in the run log
    return InFp32


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = make_layer_norm(config.hidden_size, config.layer_norm_eps, config.fused_layer_norm)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                packing: Packing | None = None) -> torch.Tensor:
        """[batch, seq, hidden]; with ``packing``, [tokens, hidden] of the real tokens alone."""
        if packing is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        else:
            input_ids, token_type_ids, positions = (packing.gather(input_ids), packing.gather(token_type_ids),
                                                    packing.positions)
        embeddings = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
                      + self.token_type_embeddings(token_type_ids))
        return self.dropout(self.LayerNorm(embeddings))


class BertSelfAttention(nn.Module):
    """Q/K/V projections for this layer's heads and SDPA; returns the per-head context, concatenated.

    ``kernels`` records, per layout, the SDPA kernel the first training call of that layout dispatched to.
    """

    def __init__(self, config: BertConfig, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_size = config.head_size
        width = num_heads * self.head_size
        self.query = nn.Linear(config.hidden_size, width)
        self.key = nn.Linear(config.hidden_size, width)
        self.value = nn.Linear(config.hidden_size, width)
        self.dropout_prob = config.attention_probs_dropout_prob
        # c_h of paper Eq. 2: one scalar per head, scaling its context output before W_O.
        self.head_coefficients = nn.Parameter(torch.ones(num_heads)) if config.slimming else None
        self.kernels: dict[str, str] = {}

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.num_heads, self.head_size).transpose(1, 2)

    def _recording(self, layout: str) -> bool:
        # is_compiling() first: under torch.compile the condition folds to False without a guard on the attributes
        return not torch.compiler.is_compiling() and self.training and layout not in self.kernels

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | Packing | None) -> torch.Tensor:
        """``attention_mask``: a boolean [B, 1, 1, T] key-padding mask, None (no padding: flash may run on CUDA), or
        the Packing of unpadded [tokens, hidden] input."""
        if isinstance(attention_mask, Packing):
            return self._forward_packed(hidden, attention_mask)
        query, key, value = (self._split_heads(proj(hidden)) for proj in (self.query, self.key, self.value))
        dropout_p = self.dropout_prob if self.training else 0.0
        layout = "padded" if attention_mask is not None else "unmasked"
        if self._recording(layout):
            self.kernels[layout] = sdpa_backend(query, key, value, attention_mask, dropout_p)
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout_p)
        if self.head_coefficients is not None:
            context = context * self.head_coefficients.view(1, -1, 1, 1).to(context.dtype)
        batch, _, seq, _ = context.shape
        return context.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_size)

    def _forward_packed(self, hidden: torch.Tensor, packing: Packing) -> torch.Tensor:
        query, key, value = (proj(hidden).view(-1, self.num_heads, self.head_size)
                             for proj in (self.query, self.key, self.value))
        dropout_p = self.dropout_prob if self.training else 0.0
        if self._recording("unpadded"):
            self.kernels["unpadded"] = varlen_backend(query, key, value, packing, dropout_p)
        context = varlen_attention(query, key, value, packing, dropout_p)
        if self.head_coefficients is not None:
            context = context * self.head_coefficients.view(1, -1, 1).to(context.dtype)
        return context.flatten(1)


class BertSelfOutput(nn.Module):
    """W_O, dropout, residual and LayerNorm (post-LN)."""

    def __init__(self, config: BertConfig, input_width: int):
        super().__init__()
        self.dense = nn.Linear(input_width, config.hidden_size)
        self.LayerNorm = make_layer_norm(config.hidden_size, config.layer_norm_eps, config.fused_layer_norm)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig, num_heads: int):
        super().__init__()
        self.self = BertSelfAttention(config, num_heads)
        self.output = BertSelfOutput(config, num_heads * config.head_size)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | Packing | None) -> torch.Tensor:
        return self.output(self.self(hidden, attention_mask), hidden)


class BertIntermediate(nn.Module):
    """W1 and GELU; with slimming, each neuron's activation is scaled by its coefficient c_f (paper Eq. 3)."""

    def __init__(self, config: BertConfig, width: int):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, width)
        self.neuron_coefficients = nn.Parameter(torch.ones(width)) if config.slimming else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        activation = F.gelu(self.dense(hidden))
        if self.neuron_coefficients is not None:
            activation = activation * self.neuron_coefficients.to(activation.dtype)
        return activation


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig, num_heads: int, ffn_width: int):
        super().__init__()
        self.attention = BertAttention(config, num_heads)
        self.intermediate = BertIntermediate(config, ffn_width)
        self.output = BertSelfOutput(config, ffn_width)  # W2, dropout, residual, LayerNorm: same shape as W_O's

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | Packing | None) -> torch.Tensor:
        attended = self.attention(hidden, attention_mask)
        return self.output(self.intermediate(attended), attended)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(
            BertLayer(config, heads, width) for heads, width in zip(config.heads_per_layer, config.ffn_per_layer))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | Packing | None) -> torch.Tensor:
        for layer in self.layer:
            hidden = layer(hidden, attention_mask)
        return hidden


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, first_tokens: torch.Tensor) -> torch.Tensor:
        """``first_tokens``: each sequence's [CLS] hidden state, [batch, hidden]."""
        return torch.tanh(self.dense(first_tokens))


class BertPreTrainedModel(nn.Module):
    """Shared initialisation (transformers' scheme) and the slimming-coefficient accessors."""

    config: BertConfig

    def init_weights(self) -> None:
        self.apply(self._init_module)

    def _init_module(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif hasattr(module, "weight") and hasattr(module, "bias") and "LayerNorm" in type(module).__name__:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def slimming_coefficients(self) -> Iterator[tuple[str, int, torch.Tensor]]:
        """Yield ("head" | "ffn", layer index, coefficient tensor) for every slimming coefficient."""
        for index, layer in enumerate(self.encoder_layers()):
            if layer.attention.self.head_coefficients is not None:
                yield "head", index, layer.attention.self.head_coefficients
            if layer.intermediate.neuron_coefficients is not None:
                yield "ffn", index, layer.intermediate.neuron_coefficients

    def add_slimming_coefficients(self) -> None:
        """Attach coefficients at 1.0 (the network's function is unchanged), e.g. to search from pre-trained weights."""
        for layer in self.encoder_layers():
            device = layer.intermediate.dense.weight.device
            if layer.attention.self.head_coefficients is None:
                layer.attention.self.head_coefficients = nn.Parameter(
                    torch.ones(layer.attention.self.num_heads, device=device))
            if layer.intermediate.neuron_coefficients is None:
                layer.intermediate.neuron_coefficients = nn.Parameter(
                    torch.ones(layer.intermediate.dense.out_features, device=device))
        self.config.slimming = True

    def attention_kernels(self) -> list[str]:
        """The SDPA kernels training ran, as "layout:kernel" (e.g. "unmasked:flash", "padded:mem-efficient",
        "unpadded:per-sequence:cpu-flash"), from each layer's first call per layout; "unrecorded" for a layer that
        has not been called in training mode outside torch.compile."""
        names = set()
        for layer in self.encoder_layers():
            kernels = layer.attention.self.kernels
            names.update([f"{layout}:{kernel}" for layout, kernel in kernels.items()] or ["unrecorded"])
        return sorted(names)

    def encoder_layers(self) -> list[BertLayer]:
        return list(self.bert_model().encoder.layer)

    def bert_model(self) -> BertModel:
        return self.bert

    def num_parameters(self, component: str | None = None) -> int:
        """Distinct parameters (the tied decoder counts once); ``component`` picks one key of ``parameter_counts``."""
        if component is None:
            return sum(p.numel() for p in self.parameters())
        return parameter_counts(self.config)[component]

    def flops_per_token(self, seq_len: int, masked_fraction: float = DEFAULT_MASKED_FRACTION) -> float:
        """Training FLOPs (forward + backward) per token at this sequence length; see ``flops_per_token``."""
        return flops_per_token(self.config, seq_len, masked_fraction)


class BertModel(BertPreTrainedModel):
    """Embeddings, encoder and pooler; returns (sequence_output, pooled_output)."""

    def __init__(self, config: BertConfig, add_pooler: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooler else None
        self.init_weights()

    def bert_model(self) -> BertModel:
        return self

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(sequence_output [batch, seq, hidden], pooled_output); unpadded, the padding positions hold zeros."""
        hidden, pooled_output, packing = self.encode(input_ids, token_type_ids, attention_mask)
        return (hidden if packing is None else packing.scatter(hidden)), pooled_output

    def encode(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, Packing | None]:
        """(encoder output, pooled_output, packing): [tokens, hidden] of the real tokens when ``packing`` is not None
        (the model runs unpadded, ``config.unpad``), else [batch, seq, hidden]."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        lengths = None if attention_mask is None else attention_mask.bool().sum(1).tolist()  # one host sync
        if lengths is None or min(lengths) == attention_mask.shape[1]:
            key_mask, packing = None, None  # no padding: no mask, so SDPA may pick flash on CUDA
        elif self._unpadded(attention_mask, lengths):
            key_mask, packing = None, Packing.from_mask(attention_mask, lengths)
        else:
            key_mask, packing = attention_mask.bool()[:, None, None, :], None  # True = attend, over heads and queries
        if packing is None:
            hidden = self.encoder(self.embeddings(input_ids, token_type_ids), key_mask)
            first_tokens = hidden[:, 0]
        else:
            hidden = self.encoder(self.embeddings(input_ids, token_type_ids, packing), packing)
            first_tokens = packing.first_tokens(hidden)
        pooled_output = self.pooler(first_tokens) if self.pooler is not None else None
        return hidden, pooled_output, packing

    def _unpadded(self, attention_mask: torch.Tensor, lengths: list[int]) -> bool:
        if self.config.unpad is False or min(lengths) == 0:  # an all-padding row has no token to pool
            return False
        if self.config.unpad is True:
            return True
        # auto leaves a compiled encoder padded: every batch's lengths would be a new graph to compile
        padding = 1.0 - sum(lengths) / attention_mask.numel()
        return self.encoder._compiled_call_impl is None and worth_unpadding(attention_mask.device, padding)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = make_layer_norm(config.hidden_size, config.layer_norm_eps, config.fused_layer_norm)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(hidden)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias  # one output bias under both HF names

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden))


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class BertForPreTraining(BertPreTrainedModel):
    """BERT with the MLM and NSP heads; the MLM decoder is tied to the word embeddings."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertPreTrainingHeads(config)
        self.init_weights()
        self.tie_weights()

    def tie_weights(self) -> None:
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                next_sentence_label: torch.Tensor | None = None) -> PreTrainingOutput:
        hidden, pooled_output, packing = self.bert.encode(input_ids, token_type_ids, attention_mask)
        seq_relationship_logits = self.cls.seq_relationship(pooled_output)
        mlm_loss = nsp_loss = None
        if labels is None:
            prediction_logits = self.cls.predictions(hidden)
            if packing is not None:  # zeros at the padding, which never went through the head
                prediction_logits = packing.scatter(prediction_logits)
        else:
            # Sparse prediction: only masked positions go through the transform and the vocab-sized decoder, which
            # is the largest matmul at seq 128; the mean over them equals the dense cross-entropy with ignore_index.
            # Unpadded, labels on padding positions are dropped with the padding (batches never set them).
            if packing is not None:
                labels = packing.gather(labels)
            masked = labels != IGNORE_INDEX
            prediction_logits = self.cls.predictions(hidden[masked])
            if prediction_logits.shape[0]:
                mlm_loss = F.cross_entropy(prediction_logits.float(), labels[masked])
            else:  # no masked token: a zero loss that keeps the graph (the dense mean would be 0/0 = NaN)
                mlm_loss = prediction_logits.sum() * 0.0
        if next_sentence_label is not None:
            nsp_loss = F.cross_entropy(seq_relationship_logits.float(), next_sentence_label.view(-1))
        losses = [term for term in (mlm_loss, nsp_loss) if term is not None]
        loss = sum(losses[1:], losses[0]) if losses else None
        return PreTrainingOutput(loss, mlm_loss, nsp_loss, prediction_logits, seq_relationship_logits)




def parameter_counts(config: BertConfig) -> dict[str, int]:
    """Parameters per component, computed from the geometry alone (coefficients under "slimming")."""
    hidden, head_size = config.hidden_size, config.head_size
    layer_norm = 2 * hidden
    attention = sum(4 * heads * head_size * hidden + 3 * heads * head_size + hidden + layer_norm
                    for heads in config.heads_per_layer)
    ffn = sum(2 * width * hidden + width + hidden + layer_norm for width in config.ffn_per_layer)
    counts = {
        "embeddings": (config.vocab_size + config.max_position_embeddings + config.type_vocab_size) * hidden
        + layer_norm,
        "attention": attention,
        "ffn": ffn,
        "pooler": hidden * hidden + hidden,
        "mlm_head": hidden * hidden + hidden + layer_norm + config.vocab_size,  # decoder weight tied to embeddings
        "nsp_head": 2 * hidden + 2,
        "slimming": (sum(config.heads_per_layer) + sum(config.ffn_per_layer)) if config.slimming else 0,
    }
    counts["total"] = sum(counts.values())
    return counts


def flops_per_token(config: BertConfig, seq_len: int, masked_fraction: float = DEFAULT_MASKED_FRACTION,
                    by_component: bool = False) -> float | dict[str, float]:
    """Training FLOPs per token: 3x the forward matmul FLOPs (backward costs twice the forward).

    Counts the Q/K/V/O and FFN matmuls (2 FLOPs per multiply-add), the attention scores and weighted sum
    (2 * 2 * seq_len * heads * head_size per token), the MLM head on masked positions only (sparse prediction) and the
    pooler / NSP head once per sequence. Element-wise ops, softmax and LayerNorm are left out, as is usual.
    """
    hidden, head_size = config.hidden_size, config.head_size
    attention = sum(2 * 4 * heads * head_size * hidden + 2 * 2 * seq_len * heads * head_size
                    for heads in config.heads_per_layer)
    ffn = sum(2 * 2 * width * hidden for width in config.ffn_per_layer)
    mlm_head = masked_fraction * 2 * (hidden * hidden + hidden * config.vocab_size)
    pooler_nsp = 2 * (hidden * hidden + 2 * hidden) / seq_len
    forward = {"attention": attention, "ffn": ffn, "mlm_head": mlm_head, "pooler_nsp": pooler_nsp}
    training = {name: 3.0 * value for name, value in forward.items()}
    if by_component:
        training["total"] = sum(training.values())
        return training
    return sum(training.values())
