"""EarlyBERT tickets: which attention heads and FFN neurons survive (paper Sec. 3.2, "Ticket-drawing Stage").

A ``Ticket`` lists the kept head / neuron indices of every layer of the network it was drawn from, with that
network's geometry, so it can be saved as JSON, checked against a model and applied to any weights of that geometry
(θ0 for pre-training, searched or pre-trained weights for fine-tuning). This module draws tickets from slimming
coefficients (``draw_ticket``) or at random (``random_ticket``, the paper's baseline of Table 1 / Sec. 3.3) and adds
the L1 penalty of the search stage (``l1_penalty``, Eq. 4) in ``draw.py``. Physical pruning lives in ``prune.py``,
mask distances and the early-bird detector in ``distance.py``, the Figure-1 heatmap in ``history.py``.

Drawing rules (Sec. 3.2): heads are pruned layer-wise by smallest |c_h| (a fixed count or ratio per layer); FFN
neurons by smallest |c_f| over all layers at once ("global", the paper's choice) or per layer ("layerwise"). Exact
ties are broken by a fixed seeded permutation of the positions (``draw._smallest_first``), so a draw is a pure
function of the coefficients and no layer or index is favoured. A layer never loses all its units: under global FFN
pruning each layer's best neuron is exempt, the next-smallest neuron elsewhere is pruned instead (the total stays
exact), and ``ffn_layers_kept_best_unit`` records the layers where the rule changed the outcome.
``coefficient_dtype`` records the dtype of the coefficients a ticket was drawn from (float32 in every training
precision; absent, i.e. None, in older tickets and random ones).
"""

from __future__ import annotations

import hashlib
import json
import os
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from earlybert_pretrain.common.files import atomic_write_text, read_json
from earlybert_pretrain.config import FfnScope, coerce
from earlybert_pretrain.errors import ConfigError, TicketError
from earlybert_pretrain.model.bert import BertConfig

TICKET_FORMAT = "earlybert-ticket"
SCHEMA_VERSION = 1
FFN_SCOPES = typing.get_args(FfnScope)
# Geometry the kept indices refer to; check_fits compares these. The others only rebuild a config for reports.
STRUCTURAL_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "heads_per_layer", "ffn_per_layer")
GEOMETRY_FIELDS = STRUCTURAL_FIELDS + ("intermediate_size", "vocab_size", "max_position_embeddings",
                                       "type_vocab_size")
GEOMETRY_TYPES = {name: list[int] if name.endswith("_per_layer") else int for name in GEOMETRY_FIELDS}
NO_COEFFICIENTS_HINT = "call model.add_slimming_coefficients() or set config.slimming"
REPORT_SEQ_LENS = (128, 512)  # the two phases of the pre-training recipe (Sec. 4.1)


def geometry_of(config: BertConfig) -> dict:
    return {name: getattr(config, name) for name in GEOMETRY_FIELDS}


def _typed_fields(cls: type, values: Mapping, where: str) -> dict:
    """The ticket's fields from a loaded JSON object, each checked against its annotation (and the geometry's
    against ``GEOMETRY_TYPES``): "128" for an integer is refused here, naming the field, not compared later."""
    hints = typing.get_type_hints(cls)
    try:
        typed = {name: coerce(value, hints[name], f"{where}: ticket field {name}") for name, value in values.items()
                 if name in hints}
        geometry = typed.get("source_geometry")
        if not isinstance(geometry, Mapping):
            raise ConfigError(f"{where}: ticket field source_geometry: expected an object, got {geometry!r}")
        for name, tp in GEOMETRY_TYPES.items():
            if name in geometry:
                coerce(geometry[name], tp, f"{where}: ticket field source_geometry.{name}")
    except ConfigError as err:
        raise TicketError(str(err)) from None
    return typed


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
    coefficient_dtype: str | None = None  # dtype of the ranked coefficients ("float32"); None: random or older
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
        typed = _typed_fields(cls, values, where)
        try:
            ticket = cls(**typed)
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
