"""EarlyBERT tickets: which attention heads and FFN neurons survive (paper Sec. 3.2, "Ticket-drawing Stage").

A ``Ticket`` lists the kept head / neuron indices of every layer of the network it was drawn from, with that
network's geometry, so it can be saved as JSON, checked against a model and applied to any weights of that geometry
(θ0 for pre-training, searched or pre-trained weights for fine-tuning). This module draws tickets from slimming
coefficients (``draw_ticket``) or at random (``random_ticket``, the paper's baseline of Table 1 / Sec. 3.3) and adds
the L1 penalty of the search stage (``l1_penalty``, Eq. 4). Physical pruning lives in ``pruning.py`` and mask
distances / the early-bird detector / the Figure-1 heatmap in ``mask_history.py``; both are importable from here.

Drawing rules (Sec. 3.2): heads are pruned layer-wise by smallest |c_h| (a fixed count or ratio per layer); FFN
neurons by smallest |c_f| over all layers at once ("global", the paper's choice) or per layer ("layerwise"). Ties
are broken by position (lower layer, then lower index, is pruned first), so a draw is a pure function of the
coefficients. A layer never loses all its units: under global FFN pruning each layer's best neuron is exempt, the
next-smallest neuron elsewhere is pruned instead (the total stays exact), and ``ffn_layers_kept_best_unit`` records
the layers where the rule changed the outcome.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from .atomic import atomic_write_text, read_json
from .mask_history import EarlyBirdDetector, MaskHistory, mask_distance
from .modeling import BertConfig, BertPreTrainedModel, flops_per_token, parameter_counts
from .pruning import prune

__all__ = [
    "EarlyBirdDetector", "MaskHistory", "Ticket", "TicketError", "draw_ticket", "gather_coefficients",
    "geometry_of", "l1_penalty", "mask_distance", "prune", "random_ticket", "render_report", "ticket_report",
]

TICKET_FORMAT = "earlybert-ticket"
SCHEMA_VERSION = 1
FFN_SCOPES = ("global", "layerwise")
# Geometry the kept indices refer to; check_fits compares these. The others only rebuild a config for reports.
STRUCTURAL_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "heads_per_layer", "ffn_per_layer")
GEOMETRY_FIELDS = STRUCTURAL_FIELDS + ("intermediate_size", "vocab_size", "max_position_embeddings",
                                       "type_vocab_size")
NO_COEFFICIENTS_HINT = "call model.add_slimming_coefficients() or set config.slimming"
REPORT_SEQ_LENS = (128, 512)  # the two phases of the pre-training recipe (Sec. 4.1)


class TicketError(ValueError):
    """A ticket that is malformed, corrupt, or drawn for another geometry; the message says which and why."""


def geometry_of(config: BertConfig) -> dict:
    return {name: getattr(config, name) for name in GEOMETRY_FIELDS}


@dataclass
class Ticket:
    """Kept heads / FFN neurons per layer (sorted indices into the source network) plus how they were drawn."""

    heads_kept: list[list[int]]
    ffn_kept: list[list[int]]
    source_geometry: dict
    step: int | None = None  # search step the coefficients came from
    method: str = "slimming"  # slimming | random
    lam_heads: float | None = None
    lam_ffn: float | None = None
    heads_to_prune: float = 0
    ffn_ratio: float = 0.0
    ffn_scope: str = "global"
    seed: int | None = None  # random tickets only
    ffn_multiple_of: int = 1  # kept FFN widths rounded to multiples of this (see _round_widths)
    # Layers whose best FFN neuron was kept because a plain global pick would have pruned them empty.
    ffn_layers_kept_best_unit: list[int] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        self.heads_kept = [[int(i) for i in layer] for layer in self.heads_kept]
        self.ffn_kept = [[int(i) for i in layer] for layer in self.ffn_kept]
        self.validate()

    def validate(self) -> None:
        """Raise TicketError unless every layer's indices are sorted, distinct, in range and non-empty."""
        missing = [name for name in STRUCTURAL_FIELDS if name not in self.source_geometry]
        if missing:
            raise TicketError(f"ticket source_geometry lacks {', '.join(missing)}")
        layers = self.source_geometry["num_hidden_layers"]
        for kind, kept, sizes in (("heads_kept", self.heads_kept, self.source_geometry["heads_per_layer"]),
                                  ("ffn_kept", self.ffn_kept, self.source_geometry["ffn_per_layer"])):
            if len(kept) != layers or len(sizes) != layers:
                raise TicketError(f"ticket {kind} has {len(kept)} layers, its source geometry {layers}")
            for layer, (indices, size) in enumerate(zip(kept, sizes)):
                if not indices:
                    raise TicketError(f"ticket {kind}[{layer}] is empty; a layer must keep at least one unit")
                if any(b <= a for a, b in zip(indices, indices[1:])):
                    raise TicketError(f"ticket {kind}[{layer}] is not sorted and duplicate-free")
                if indices[0] < 0 or indices[-1] >= size:
                    raise TicketError(f"ticket {kind}[{layer}] has an index outside 0..{size - 1}")
        if self.ffn_scope not in FFN_SCOPES:
            raise TicketError(f"ticket ffn_scope={self.ffn_scope!r}, expected one of {FFN_SCOPES}")

    # --- identity and persistence -------------------------------------------------------------------------------

    def digest(self) -> str:
        """SHA-256 of the kept indices and the structural source geometry: equal digests mean the same sub-network."""
        content = {"heads_kept": self.heads_kept, "ffn_kept": self.ffn_kept,
                   "geometry": {name: self.source_geometry[name] for name in STRUCTURAL_FIELDS}}
        return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def to_dict(self) -> dict:
        return {"format": TICKET_FORMAT, "digest": self.digest(), **asdict(self)}

    @classmethod
    def from_dict(cls, values: object, where: str = "ticket") -> Ticket:
        """Rebuild from ``to_dict`` output; ``where`` (e.g. a file name) prefixes every error."""
        if not isinstance(values, Mapping) or values.get("format") != TICKET_FORMAT:
            raise TicketError(f"{where}: not an EarlyBERT ticket (expected a JSON object with "
                              f"\"format\": \"{TICKET_FORMAT}\")")
        if values.get("schema_version") != SCHEMA_VERSION:
            raise TicketError(f"{where}: ticket schema_version {values.get('schema_version')!r}, this code reads "
                              f"version {SCHEMA_VERSION}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known - {"format", "digest"})
        if unknown:
            raise TicketError(f"{where}: unknown ticket fields {', '.join(unknown)}")
        try:
            ticket = cls(**{k: v for k, v in values.items() if k in known})
        except TicketError as err:
            raise TicketError(f"{where}: {err}") from None
        except (TypeError, ValueError) as err:
            raise TicketError(f"{where}: malformed ticket ({err})") from None
        if values.get("digest") != ticket.digest():
            raise TicketError(f"{where}: digest mismatch (stored {values.get('digest')!r}, content hashes to "
                              f"{ticket.digest()!r}); the file was edited or corrupted")
        return ticket

    def to_json(self) -> str:
        """Indented JSON with one line per layer of kept indices (one index per line would run to ~25k lines)."""
        values = self.to_dict()
        lines = []
        kept_keys = ("heads_kept", "ffn_kept")
        for key in sorted(values.keys() - set(kept_keys)):
            lines.append(f"  {json.dumps(key)}: {json.dumps(values[key], sort_keys=True)}")
        for key in kept_keys:  # last, so the metadata reads first
            rows = ",\n".join(f"    {json.dumps(layer, separators=(',', ':'))}" for layer in values[key])
            lines.append(f'  "{key}": [\n{rows}\n  ]')
        return "{\n" + ",\n".join(lines) + "\n}\n"

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Ticket:
        return cls.from_dict(read_json(path, "ticket", TicketError), where=str(path))

    # --- geometry ----------------------------------------------------------------------------------------------

    def check_fits(self, config: BertConfig) -> None:
        """Raise TicketError naming the first field where ``config`` differs from the geometry this was drawn for."""
        for name in STRUCTURAL_FIELDS:
            expected, actual = self.source_geometry[name], getattr(config, name)
            if expected != actual:
                raise TicketError(f"ticket (digest {self.digest()[:12]}) was drawn for {name}={expected}, "
                                  f"but the model has {name}={actual}")

    def source_config(self) -> BertConfig:
        """The source network's config rebuilt from the recorded geometry (no dropout settings recorded)."""
        return BertConfig.from_dict(self.source_geometry)

    def pruned_config(self, config: BertConfig) -> BertConfig:
        """A copy of ``config`` with this ticket's per-layer geometry and no slimming coefficients."""
        self.check_fits(config)
        values = config.to_dict()
        values.update(heads_per_layer=[len(kept) for kept in self.heads_kept],
                      ffn_per_layer=[len(kept) for kept in self.ffn_kept], slimming=False)
        return BertConfig.from_dict(values)

    def masks(self) -> tuple[np.ndarray, np.ndarray]:
        """Boolean keep-masks over all heads and all FFN neurons of the source network, layer after layer."""
        def flat(kept: list[list[int]], sizes: list[int]) -> np.ndarray:
            parts = []
            for indices, size in zip(kept, sizes):
                mask = np.zeros(size, dtype=bool)
                mask[indices] = True
                parts.append(mask)
            return np.concatenate(parts)

        return (flat(self.heads_kept, self.source_geometry["heads_per_layer"]),
                flat(self.ffn_kept, self.source_geometry["ffn_per_layer"]))


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
    """``{"head": [...], "ffn": [...]}``: detached float32 CPU copies, one tensor per layer."""
    gathered: dict[str, dict[int, torch.Tensor]] = {"head": {}, "ffn": {}}
    for kind, layer, coefficients in model.slimming_coefficients():
        gathered[kind][layer] = coefficients.detach().float().cpu().clone()
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
        raise ValueError(f"{name} must be a fraction in [0, 1), got {ratio}")
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
        raise ValueError(f"heads_to_prune must be a whole number of heads per layer or a ratio in (0, 1), "
                         f"got {heads_to_prune}")
    for layer, (count, heads) in enumerate(zip(counts, heads_per_layer)):
        if count >= heads:
            raise ValueError(f"heads_to_prune={heads_to_prune} would prune {count} of the {heads} heads in layer "
                             f"{layer}; at least one head must survive")
    return counts


def _smallest_first(scores: torch.Tensor) -> torch.Tensor:
    """Indices ordering ``scores`` ascending; ties in position order (stable sort), so draws are reproducible."""
    return torch.sort(scores, stable=True).indices


def _top(scores: torch.Tensor, count: int) -> list[int]:
    """Sorted indices of the ``count`` largest scores: exactly the units a smallest-first pruning order keeps."""
    return sorted(_smallest_first(scores)[len(scores) - count:].tolist())


def _prune_layerwise(scores: list[torch.Tensor], counts: list[int]) -> list[list[int]]:
    return [_top(layer_scores, len(layer_scores) - count) for layer_scores, count in zip(scores, counts)]


def _prune_global(scores: list[torch.Tensor], ratio: float) -> tuple[list[list[int]], list[int]]:
    """Prune the ``ratio`` smallest scores over all layers, never a layer's best unit; also the layers where that
    exemption changed the outcome (a plain global pick would have emptied them)."""
    sizes = [len(s) for s in scores]
    offsets = np.cumsum([0] + sizes)
    flat = torch.cat(scores)
    order = _smallest_first(flat)
    best = {int(offsets[layer]) + int(_smallest_first(s)[-1]) for layer, s in enumerate(scores)}
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
        raise ValueError(f"ffn_scope={ffn_scope!r}, expected one of {FFN_SCOPES}")
    if int(ffn_multiple_of) != ffn_multiple_of or ffn_multiple_of < 1:
        raise ValueError(f"ffn_multiple_of must be a positive integer, got {ffn_multiple_of}")
    heads_kept = _prune_layerwise(head_scores, _heads_to_prune_per_layer(heads_to_prune, config.heads_per_layer))
    if ffn_scope == "global":
        ffn_kept, rescued = _prune_global(ffn_scores, ffn_ratio)
    else:
        ffn_kept = _prune_layerwise(ffn_scores, [_prune_count(ffn_ratio, len(s)) for s in ffn_scores])
        rescued = []
    if ffn_multiple_of > 1:
        widths = _round_widths([len(kept) for kept in ffn_kept], config.ffn_per_layer, int(ffn_multiple_of))
        ffn_kept = [_top(scores, width) for scores, width in zip(ffn_scores, widths)]
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
                raise ValueError(f"coefficients[{kind!r}][{layer}] contains NaN or infinite values; the search "
                                 f"diverged (lower the learning rate or lambda)")
            checked[kind].append(values.abs())
    return checked["head"], checked["ffn"]


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
                             ffn_multiple_of, step=step, lam_heads=lam_heads, lam_ffn=lam_ffn)


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


# --- report -----------------------------------------------------------------------------------------------------


def ticket_report(ticket: Ticket, config: BertConfig | None = None) -> dict:
    """Per-layer kept units, parameters and training FLOPs per token, pruned vs dense.

    The predicted step-time ratio is the training-FLOP ratio at that sequence length (``modeling.flops_per_token``:
    matmuls only, sparse MLM head). Without ``config`` the source config is rebuilt from the ticket's geometry.
    """
    dense = BertConfig.from_dict({**(config or ticket.source_config()).to_dict(), "slimming": False})
    pruned = ticket.pruned_config(dense)
    dense_params, pruned_params = parameter_counts(dense), parameter_counts(pruned)
    report = {
        "digest": ticket.digest(), "method": ticket.method, "step": ticket.step, "ffn_scope": ticket.ffn_scope,
        "layers": [{"layer": layer, "heads_kept": len(heads), "heads_total": dense.heads_per_layer[layer],
                    "ffn_kept": len(ffn), "ffn_total": dense.ffn_per_layer[layer]}
                   for layer, (heads, ffn) in enumerate(zip(ticket.heads_kept, ticket.ffn_kept))],
        "ffn_layers_kept_best_unit": ticket.ffn_layers_kept_best_unit,
        "parameters": {component: {"dense": dense_params[component], "pruned": pruned_params[component],
                                   "ratio": pruned_params[component] / dense_params[component]}
                       for component in ("attention", "ffn", "total")},
        "flops_per_token": {},
    }
    for seq_len in REPORT_SEQ_LENS:
        dense_flops, pruned_flops = flops_per_token(dense, seq_len), flops_per_token(pruned, seq_len)
        report["flops_per_token"][seq_len] = {"dense": dense_flops, "pruned": pruned_flops,
                                              "ratio": pruned_flops / dense_flops,
                                              "predicted_step_time_ratio": pruned_flops / dense_flops}
    return report


def render_report(report: dict) -> str:
    """The ``ticket_report`` dict as the text ``earlybert-ticket report`` prints."""
    lines = [f"ticket {report['digest'][:12]}  method={report['method']}  step={report['step']}  "
             f"ffn_scope={report['ffn_scope']}", "layer  heads kept  FFN neurons kept"]
    for row in report["layers"]:
        lines.append(f"{row['layer']:>5}  {row['heads_kept']:>5} / {row['heads_total']:<3}"
                     f"{row['ffn_kept']:>7} / {row['ffn_total']}")
    if report["ffn_layers_kept_best_unit"]:
        lines.append(f"note: global FFN pruning would have emptied layers {report['ffn_layers_kept_best_unit']}; "
                     f"each kept its best neuron")
    lines.append("parameters        dense       pruned   ratio")
    for component, row in report["parameters"].items():
        lines.append(f"{component:<10} {row['dense']:>12,} {row['pruned']:>12,}   {row['ratio']:.3f}")
    lines.append("seq   training GFLOP/token dense  pruned   FLOP ratio = predicted step-time ratio")
    for seq_len, row in report["flops_per_token"].items():
        lines.append(f"{seq_len:<5} {row['dense'] / 1e9:>26.4g} {row['pruned'] / 1e9:>7.4g}   {row['ratio']:.3f}")
    return "\n".join(lines)
