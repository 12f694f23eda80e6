"""Unpadded BERT: a padded batch's real tokens packed into one matrix, and attention over variable-length sequences.

Padding never enters a per-token layer (embeddings, Q/K/V, W_O, FFN, LayerNorm): the model gathers the real tokens
into a [tokens, hidden] matrix before the embeddings and scatters back only what a head needs, as MosaicML's
unpadded BERT does. Attention is the one layer that needs the sequences back: on CUDA as jagged nested tensors (SDPA
sends them to the flash / memory-efficient variable-length kernels), elsewhere as one unmasked SDPA call per sequence
(PyTorch's CPU nested-tensor SDPA is a math fallback, measured ~7x slower than that loop at seq 512).

Also here: which kernel SDPA's dispatcher picks for a call, so the run log names the kernel that ran, not the ones
that are enabled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

# The padding fraction above which ``unpad: auto`` packs a CUDA batch; below it the gather / scatter and the
# per-batch host sync cost about what the skipped padding would.
AUTO_UNPAD_MIN_PADDING = 0.1

_BACKEND_NAMES = {int(SDPBackend.MATH): "math", int(SDPBackend.FLASH_ATTENTION): "flash",
                  int(SDPBackend.EFFICIENT_ATTENTION): "mem-efficient", int(SDPBackend.CUDNN_ATTENTION): "cudnn",
                  int(SDPBackend.OVERRIDEABLE): "overrideable", int(SDPBackend.ERROR): "error"}


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of a padded [batch, seq] batch are; every sequence holds at least one of them."""

    indices: torch.Tensor  # [tokens]: positions of the real tokens in the flattened batch, row-major
    offsets: torch.Tensor  # [batch + 1]: where each sequence starts among the packed tokens (on the batch's device)
    lengths: tuple[int, ...]  # real tokens per sequence, on the host
    seq_len: int

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor, lengths: list[int]) -> Packing:
        """``attention_mask``: [batch, seq], True (or 1) = a real token; ``lengths``: its row sums, on the host."""
        mask = attention_mask.bool()
        indices = mask.flatten().nonzero().flatten()
        offsets = F.pad(mask.sum(1).cumsum(0), (1, 0))
        return cls(indices, offsets, tuple(lengths), mask.shape[1])

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def positions(self) -> torch.Tensor:
        """Each real token's position in its sequence, for the position embeddings."""
        return self.indices % self.seq_len

    def gather(self, padded: torch.Tensor) -> torch.Tensor:
        """[batch, seq, ...] -> [tokens, ...]."""
        return padded.flatten(0, 1).index_select(0, self.indices)

    def scatter(self, packed: torch.Tensor) -> torch.Tensor:
        """[tokens, ...] -> [batch, seq, ...], zeros at the padding."""
        padded = packed.new_zeros(self.batch * self.seq_len, *packed.shape[1:])
        return padded.index_copy(0, self.indices, packed).view(self.batch, self.seq_len, *packed.shape[1:])

    def first_tokens(self, packed: torch.Tensor) -> torch.Tensor:
        """Each sequence's first real token (the [CLS] of a right-padded BERT batch): [batch, ...]."""
        return packed.index_select(0, self.offsets[:-1])


def use_nested(device: torch.device) -> bool:
    """Jagged nested tensors where SDPA has variable-length kernels for them (CUDA), else the per-sequence loop."""
    return device.type == "cuda" and hasattr(torch.nested, "nested_tensor_from_jagged")


def varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, packing: Packing,
                     dropout_p: float, nested: bool | None = None) -> torch.Tensor:
    """Attention of each sequence's real tokens over its real tokens; [tokens, heads, head_size] in and out.

    ``nested`` picks jagged nested tensors or the per-sequence loop; None decides by device (``use_nested``).
    """
    if use_nested(query.device) if nested is None else nested:
        jagged = [_jagged(x, packing) for x in (query, key, value)]
        return F.scaled_dot_product_attention(*jagged, dropout_p=dropout_p).transpose(1, 2).values()
    contexts = [F.scaled_dot_product_attention(*(x.transpose(0, 1)[None] for x in parts), dropout_p=dropout_p)
                for parts in zip(*(x.split(packing.lengths) for x in (query, key, value)))]
    return torch.cat([context[0].transpose(0, 1) for context in contexts])


def _jagged(packed: torch.Tensor, packing: Packing) -> torch.Tensor:
    """[tokens, heads, head_size] -> a jagged [batch, heads, seq*, head_size]; the host lengths spare SDPA a sync."""
    nested = torch.nested.nested_tensor_from_jagged(packed, packing.offsets, min_seqlen=min(packing.lengths),
                                                    max_seqlen=max(packing.lengths))
    return nested.transpose(1, 2)


def sdpa_backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                 dropout_p: float) -> str:
    """The kernel SDPA's dispatcher picks for these [batch, heads, seq, head_size] inputs, e.g. "flash".

    ``torch._fused_sdp_choice`` is the function SDPA itself calls to choose (private, but the only exact answer on
    CPU, where the public ``can_use_*`` checks do not apply). Under autocast SDPA runs in the autocast dtype.
    """
    device = query.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    name = _BACKEND_NAMES.get(torch._fused_sdp_choice(query, key, value, attn_mask, dropout_p), "unknown")
    return f"cpu-{name}" if device == "cpu" and name == "flash" else name


def varlen_backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, packing: Packing, dropout_p: float,
                   nested: bool | None = None) -> str:
    """What ``varlen_attention`` runs for these packed inputs, e.g. "nested:flash" or "per-sequence:cpu-flash"."""
    if use_nested(query.device) if nested is None else nested:
        from torch.nested._internal.sdpa import _select_sdp_backend  # nested SDPA's own (private) dispatcher

        jagged = [_jagged(x.detach(), packing) for x in (query, key, value)]
        backend = _select_sdp_backend(*jagged, None, dropout_p, False, False)
        return f"nested:{_BACKEND_NAMES.get(int(backend), 'unknown')}"
    first = [x[:packing.lengths[0]].transpose(0, 1)[None] for x in (query, key, value)]
    return f"per-sequence:{sdpa_backend(*first, None, dropout_p)}"


def worth_unpadding(device: torch.device, padding_fraction: float) -> bool:
    """``unpad: auto``: pack on CUDA once enough of the batch is padding. On CPU the padded path stays the default so
    the fp32 CPU runs (loss baselines, the demo) reproduce exactly; ``unpad: true`` packs there too (the skipped
    dropout shapes draw different random numbers, so runs are equal in distribution, not bit for bit)."""
    return device.type == "cuda" and padding_fraction >= AUTO_UNPAD_MIN_PADDING
