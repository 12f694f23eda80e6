"""Drawing tickets: the L1 penalty of the search (Eq. 4), the coefficients, and the drawing rules (Sec. 3.2).

See ``ticket.py`` for the rules: heads layer-wise by smallest |c_h|, FFN neurons globally (or per layer) by smallest
|c_f|, exact ties broken by a fixed seeded permutation of the positions (``_smallest_first``), a layer never emptied.
A drawn ticket records the dtype of the coefficients it ranked (``coefficient_dtype``): fp32 in every precision mode,
because the coefficients are fp32 parameters throughout (bf16/fp16 autocast only lowers the matmuls).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from earlybert_pretrain.errors import ConfigError
from earlybert_pretrain.model.bert import BertConfig, BertPreTrainedModel
from earlybert_pretrain.tickets.ticket import FFN_SCOPES, NO_COEFFICIENTS_HINT, Ticket, geometry_of

# --- search-stage helpers ---------------------------------------------------------------------------------------


def l1_penalty(model: BertPreTrainedModel, lam_heads: float = 1e-4, lam_ffn: float | None = None) -> torch.Tensor:
    """λ·Σ|c| over every slimming coefficient, to add to the task loss (paper Eq. 4); ``lam_ffn`` defaults to λ."""
    lam_ffn = lam_heads if lam_ffn is None else lam_ffn
    terms = [(lam_heads if kind == "head" else lam_ffn) * coefficients.abs().sum()
             for kind, _, coefficients in model.slimming_coefficients()]
    if not terms:
        raise ValueError(f"l1_penalty: the model has no slimming coefficients; {NO_COEFFICIENTS_HINT}")
    return torch.stack(terms).sum()


def gather_coefficients(model: BertPreTrainedModel) -> dict[str, list[torch.Tensor]]:
    """``{"head": [...], "ffn": [...]}``: detached CPU copies in the model's own dtype, one tensor per layer (the
    draw ranks them in float32 and records the dtype they had)."""
    gathered: dict[str, dict[int, torch.Tensor]] = {"head": {}, "ffn": {}}
    for kind, layer, coefficients in model.slimming_coefficients():
        gathered[kind][layer] = coefficients.detach().cpu().clone()
    layers = len(model.encoder_layers())
    for kind, per_layer in gathered.items():
        if len(per_layer) != layers:
            raise ValueError(f"the model has {kind} slimming coefficients in {len(per_layer)} of {layers} layers; "
                             f"{NO_COEFFICIENTS_HINT}")
    return {kind: [per_layer[i] for i in range(layers)] for kind, per_layer in gathered.items()}


# --- drawing ----------------------------------------------------------------------------------------------------


def _check_ratio(name: str, ratio: float) -> float:
    ratio = float(ratio)
    if not 0.0 <= ratio < 1.0:  # also refuses NaN
        raise ConfigError(f"{name} must be a fraction in [0, 1), got {ratio}")
    return ratio


def _prune_count(ratio: float, size: int) -> int:
    # floor, with slack for float error (0.29 * 100 = 28.999...), so a ratio below 1 never prunes a whole layer
    return math.floor(ratio * size + 1e-9)


def _heads_to_prune_per_layer(heads_to_prune: float, heads_per_layer: list[int]) -> list[int]:
    """A whole number is a count per layer; a value in (0, 1) a ratio of each layer's heads."""
    value = float(heads_to_prune)
    if value.is_integer() and value >= 0:
        counts = [int(value)] * len(heads_per_layer)
    elif 0.0 < value < 1.0:
        counts = [_prune_count(value, heads) for heads in heads_per_layer]
    else:
        raise ConfigError(f"heads_to_prune must be a whole number of heads per layer or a ratio in (0, 1), "
                         f"got {heads_to_prune}")
    for layer, (count, heads) in enumerate(zip(counts, heads_per_layer)):
        if count >= heads:
            raise ConfigError(f"heads_to_prune={heads_to_prune} would prune {count} of the {heads} heads in layer "
                             f"{layer}; at least one head must survive")
    return counts


TIE_BREAK_SEED = 0  # fixed, so a draw is a pure function of the coefficients (every rank, every rerun)


def _smallest_first(scores: torch.Tensor, salt: int = 0) -> torch.Tensor:
    """Indices ordering ``scores`` ascending; exact ties in the order of a seeded random permutation of the positions.

    Position order would favour layers: under global FFN pruning the tied units of layer 0 would always go first
    (at step 0 every coefficient is 1.0). Values that differ are ordered by value alone. Per-layer orders pass the
    layer as ``salt``, so tied layers do not all lose the same indices.
    """
    generator = torch.Generator().manual_seed(TIE_BREAK_SEED + salt)
    shuffle = torch.randperm(len(scores), generator=generator)
    return shuffle[torch.sort(scores[shuffle], stable=True).indices]


def _top(scores: torch.Tensor, count: int, salt: int = 0) -> list[int]:
    """Sorted indices of the ``count`` largest scores: exactly the units a smallest-first pruning order keeps."""
    return sorted(_smallest_first(scores, salt)[len(scores) - count:].tolist())


def _prune_layerwise(scores: list[torch.Tensor], counts: list[int]) -> list[list[int]]:
    return [_top(layer_scores, len(layer_scores) - count, layer)
            for layer, (layer_scores, count) in enumerate(zip(scores, counts))]


def _prune_global(scores: list[torch.Tensor], ratio: float) -> tuple[list[list[int]], list[int]]:
    """Prune the ``ratio`` smallest scores over all layers, never a layer's best unit; also the layers where that
    exemption changed the outcome (a plain global pick would have emptied them)."""
    sizes = [len(s) for s in scores]
    offsets = np.cumsum([0] + sizes)
    flat = torch.cat(scores)
    order = _smallest_first(flat)
    best = {int(offsets[layer]) + int(_smallest_first(s, layer)[-1]) for layer, s in enumerate(scores)}
    count = min(_prune_count(ratio, len(flat)), len(flat) - len(scores))
    pruned = [i for i in order.tolist() if i not in best][:count]
    naive = set(order[:count].tolist())
    rescued = [layer for layer in range(len(sizes))
               if all(i in naive for i in range(offsets[layer], offsets[layer + 1]))]
    pruned_set = set(pruned)
    kept = [[i - int(offsets[layer]) for i in range(offsets[layer], offsets[layer + 1]) if i not in pruned_set]
            for layer in range(len(sizes))]
    return kept, rescued


def _round_widths(widths: list[int], sizes: list[int], multiple: int) -> list[int]:
    """Round each layer's kept width to a multiple of ``multiple`` keeping the total as close as possible: round all
    down, then round up the layers with the largest remainders (ties: lower layer first). Matmuls whose width is not
    a multiple of 8 run ~17% slower per column on CPU (docs/ticket.md). A layer never drops below ``multiple``
    nor exceeds its size."""
    floors = [max(multiple, w - w % multiple) for w in widths]
    shortfall = sum(widths) - sum(floors)
    by_remainder = sorted(range(len(widths)), key=lambda layer: (floors[layer] - widths[layer], layer))
    for layer in by_remainder[:max(0, round(shortfall / multiple))]:
        floors[layer] += multiple
    return [min(width, size) for width, size in zip(floors, sizes)]


def _draw_from_scores(head_scores: list[torch.Tensor], ffn_scores: list[torch.Tensor], config: BertConfig,
                      heads_to_prune: float, ffn_ratio: float, ffn_scope: str, ffn_multiple_of: int = 1,
                      **metadata) -> Ticket:
    ffn_ratio = _check_ratio("ffn_ratio", ffn_ratio)
    if ffn_scope not in FFN_SCOPES:
        raise ConfigError(f"ffn_scope={ffn_scope!r}, expected one of {FFN_SCOPES}")
    if int(ffn_multiple_of) != ffn_multiple_of or ffn_multiple_of < 1:
        raise ConfigError(f"ffn_multiple_of must be a positive integer, got {ffn_multiple_of}")
    heads_kept = _prune_layerwise(head_scores, _heads_to_prune_per_layer(heads_to_prune, config.heads_per_layer))
    if ffn_scope == "global":
        ffn_kept, rescued = _prune_global(ffn_scores, ffn_ratio)
    else:
        ffn_kept = _prune_layerwise(ffn_scores, [_prune_count(ffn_ratio, len(s)) for s in ffn_scores])
        rescued = []
    if ffn_multiple_of > 1:
        widths = _round_widths([len(kept) for kept in ffn_kept], config.ffn_per_layer, int(ffn_multiple_of))
        ffn_kept = [_top(scores, width, layer) for layer, (scores, width) in enumerate(zip(ffn_scores, widths))]
    return Ticket(heads_kept=heads_kept, ffn_kept=ffn_kept, source_geometry=geometry_of(config),
                  heads_to_prune=float(heads_to_prune), ffn_ratio=ffn_ratio, ffn_scope=ffn_scope,
                  ffn_layers_kept_best_unit=rescued, ffn_multiple_of=int(ffn_multiple_of), **metadata)


def _checked_coefficients(coefficients: Mapping, config: BertConfig) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    checked = {}
    for kind, sizes in (("head", config.heads_per_layer), ("ffn", config.ffn_per_layer)):
        per_layer = coefficients.get(kind)
        if per_layer is None or len(per_layer) != len(sizes):
            raise ValueError(f"coefficients[{kind!r}] must hold one tensor per layer ({len(sizes)}); "
                             f"{NO_COEFFICIENTS_HINT}")
        checked[kind] = []
        for layer, (values, size) in enumerate(zip(per_layer, sizes)):
            values = torch.as_tensor(values).detach().float().cpu().reshape(-1)
            if values.numel() != size:
                raise ValueError(f"coefficients[{kind!r}][{layer}] has {values.numel()} entries, the config "
                                 f"expects {size}")
            if not torch.isfinite(values).all():
                raise ConfigError(f"coefficients[{kind!r}][{layer}] contains NaN or infinite values; the search "
                                 f"diverged (lower the learning rate or lambda)")
            checked[kind].append(values.abs())
    return checked["head"], checked["ffn"]


def _dtype_name(coefficients: Mapping) -> str:
    """The dtype the coefficients had before ranking ("float32"; mixed dtypes joined with "+")."""
    names = {str(torch.as_tensor(values).dtype).removeprefix("torch.")
             for per_layer in coefficients.values() for values in per_layer}
    return "+".join(sorted(names))


def draw_ticket(model_or_coefficients: BertPreTrainedModel | Mapping, heads_to_prune: float = 4,
                ffn_ratio: float = 0.3, ffn_scope: str = "global", *, config: BertConfig | None = None,
                step: int | None = None, lam_heads: float | None = None, lam_ffn: float | None = None,
                ffn_multiple_of: int = 1) -> Ticket:
    """Draw a ticket by smallest |c| (Sec. 3.2) from a model with slimming coefficients or a
    ``gather_coefficients`` dict (then ``config``, the model's BertConfig, is required for the geometry).

    Paper defaults (Sec. 4.2-4.3): pre-training prunes 4 heads per layer for base (6 for large) and 30% of the FFN
    neurons globally; fine-tuning the same heads and 40% of the FFN neurons. ``step`` and the lambdas are recorded.
    ``ffn_multiple_of`` (off by default) rounds every layer's kept FFN width to a multiple of it, moving the total
    by less than one multiple: the layers keep their largest-|c| neurons up to the rounded width.
    """
    if isinstance(model_or_coefficients, Mapping):
        if config is None:
            raise ValueError("draw_ticket(coefficients) needs config= (the model's BertConfig) to record the "
                             "geometry the ticket applies to")
        coefficients = model_or_coefficients
    else:
        config = config or model_or_coefficients.config
        coefficients = gather_coefficients(model_or_coefficients)
    head_scores, ffn_scores = _checked_coefficients(coefficients, config)
    return _draw_from_scores(head_scores, ffn_scores, config, heads_to_prune, ffn_ratio, ffn_scope,
                             ffn_multiple_of, step=step, lam_heads=lam_heads, lam_ffn=lam_ffn,
                             coefficient_dtype=_dtype_name(coefficients))


def random_ticket(config: BertConfig, heads_to_prune: float = 4, ffn_ratio: float = 0.3, ffn_scope: str = "global",
                  seed: int = 0, like: Ticket | None = None, ffn_multiple_of: int = 1) -> Ticket:
    """The random-pruning baseline (Sec. 3.3, Table 1): the same counts a drawn ticket has, random units.

    Heads: the same number per layer. FFN "layerwise": the same number per layer. FFN "global": the same total,
    spread uniformly at random over all neurons (subject to never emptying a layer), so the per-layer counts differ
    from a drawn ticket's. Pass ``like=drawn_ticket`` to copy its exact per-layer head and FFN counts instead
    (``like`` overrides the count arguments).
    """
    generator = torch.Generator().manual_seed(seed)
    head_scores = [torch.rand(n, generator=generator) for n in config.heads_per_layer]
    ffn_scores = [torch.rand(n, generator=generator) for n in config.ffn_per_layer]
    if like is None:
        return _draw_from_scores(head_scores, ffn_scores, config, heads_to_prune, ffn_ratio, ffn_scope,
                                 ffn_multiple_of, method="random", seed=seed)
    like.check_fits(config)
    heads_kept = [_top(scores, len(kept)) for scores, kept in zip(head_scores, like.heads_kept)]
    ffn_kept = [_top(scores, len(kept)) for scores, kept in zip(ffn_scores, like.ffn_kept)]
    return Ticket(heads_kept=heads_kept, ffn_kept=ffn_kept, source_geometry=geometry_of(config), method="random",
                  seed=seed, heads_to_prune=like.heads_to_prune, ffn_ratio=like.ffn_ratio, ffn_scope=like.ffn_scope,
                  ffn_multiple_of=like.ffn_multiple_of)


