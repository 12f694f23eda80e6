"""Exports that stock transformers loads: an adapter beside the model, working on HF-format folders' tensors.

Two formats of the same function:

* ``padded``: the uniform geometry transformers' ``BertModel`` / ``BertForPreTraining`` /
  ``BertForSequenceClassification`` / ``BertForQuestionAnswering`` build. Dropped heads come back as zero Q/K/V rows
  and zero W_O columns; dropped FFN neurons as zero W1 rows, zero bias and zero W2 columns. A zero head's context is
  multiplied by zero W_O columns and GELU(0) = 0 meets zero W2 columns, so the padded network computes exactly the
  pruned one (no custom code, the pruned model's cost).
* ``compact``: the real (uneven) sizes, with ``model/remote/*.py`` copied into the folder and ``auto_map`` in
  config.json, so ``AutoModel*.from_pretrained(folder, trust_remote_code=True)`` builds it at its true size.

``export_model`` converts one of our folders (pruned or not, pre-training or fine-tuned heads); ``apply_ticket``
prunes any HF BERT folder by a ticket's kept units. Task heads (``cls.*``, ``classifier.*``, ``qa_outputs.*``) pass
through untouched: only the encoder layers' projections change. Slimming coefficients are folded into the W_O / W2
columns they scale, as ``tickets/prune.py`` does. The output folder is written beside its target and renamed into
place, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import save

from earlybert_pretrain.common.files import atomic_folder, read_json
from earlybert_pretrain.errors import ModelFolderError
from earlybert_pretrain.model.bert import BertConfig
from earlybert_pretrain.model.hf import (
    CONFIG_NAME,
    INDEX_BUFFERS,
    SAFETENSORS_NAME,
    TOKENIZER_FILES,
    copy_tokenizer_files,
    read_config,
    read_state_dict,
)

FORMATS = ("padded", "compact")
ARCHITECTURES = ("BertModel", "BertForPreTraining", "BertForSequenceClassification", "BertForQuestionAnswering")
COMPACT_PREFIX = "Early"  # BertModel -> EarlyBertModel, the class of the same task in the shipped code
COMPACT_MODEL_TYPE = "earlybert"
REMOTE_DIR = Path(__file__).resolve().parent / "remote"
REMOTE_FILES = ("configuration_earlybert.py", "modeling_earlybert.py")
EXPORT_FILES = frozenset({CONFIG_NAME, SAFETENSORS_NAME, *TOKENIZER_FILES, *REMOTE_FILES})  # all _write ever writes
AUTO_MAP = {"AutoConfig": "configuration_earlybert.EarlyBertConfig",
            "AutoModel": "modeling_earlybert.EarlyBertModel",
            "AutoModelForPreTraining": "modeling_earlybert.EarlyBertForPreTraining",
            "AutoModelForSequenceClassification": "modeling_earlybert.EarlyBertForSequenceClassification",
            "AutoModelForQuestionAnswering": "modeling_earlybert.EarlyBertForQuestionAnswering"}
# Our BertConfig fields transformers has no use for; a padded folder drops them all (its geometry is uniform).
OUR_CONFIG_KEYS = ("heads_per_layer", "ffn_per_layer", "slimming", "fused_layer_norm", "unpad")
PRUNED_GEOMETRY_KEY = "earlybert_pruned_geometry"  # a padded folder's note of the real sizes (transformers ignores it)

HEAD_ROWS = ("attention.self.query", "attention.self.key", "attention.self.value")  # weight rows and bias
HEAD_COLUMNS = "attention.output.dense"  # W_O weight columns
FFN_ROWS = "intermediate.dense"  # W1 weight rows and bias
FFN_COLUMNS = "output.dense"  # W2 weight columns
HEAD_COEFFICIENTS = "attention.self.head_coefficients"
NEURON_COEFFICIENTS = "intermediate.neuron_coefficients"


class UnitSelection(Protocol):
    """What ``apply_ticket`` needs of a ticket (``tickets.ticket.Ticket``): kept indices and a geometry check."""

    heads_kept: list[list[int]]
    ffn_kept: list[list[int]]

    def check_fits(self, config: BertConfig) -> None: ...


@dataclass
class ModelFolder:
    """An HF-format BERT folder in memory: config.json as written, its geometry, its tensors and its task."""

    path: Path
    values: dict
    config: BertConfig
    state: dict[str, torch.Tensor]
    architecture: str

    @property
    def prefix(self) -> str:
        """Where the encoder's keys start: "bert." under a task head, "" in a bare BertModel checkpoint."""
        return "bert." if any(key.startswith("bert.encoder.") for key in self.state) else ""

    def key(self, layer: int, name: str) -> str:
        return f"{self.prefix}encoder.layer.{layer}.{name}"


def read_model_folder(folder: str | os.PathLike) -> ModelFolder:
    """Read config.json and the weights; ModelFolderError for an unknown task or shapes that disagree."""
    folder = Path(folder)
    try:
        config = read_config(folder)
        state, weights = read_state_dict(folder)
    except ModelFolderError:
        raise
    except ValueError as err:  # hf.py's messages already name the file
        raise ModelFolderError(str(err)) from None
    values = read_json(folder / CONFIG_NAME, "model config", ModelFolderError)
    architecture = (values.get("architectures") or ["BertModel"])[0].removeprefix(COMPACT_PREFIX)
    if architecture not in ARCHITECTURES:
        raise ModelFolderError(f"{folder / CONFIG_NAME}: architectures={values.get('architectures')}, expected one "
                               f"of {', '.join(ARCHITECTURES)}")
    state = {key: value for key, value in state.items() if not key.endswith(INDEX_BUFFERS)}
    model = ModelFolder(folder, values, config, state, architecture)
    head_size = config.head_size
    for layer, (heads, width) in enumerate(zip(config.heads_per_layer, config.ffn_per_layer)):
        expected = {model.key(layer, f"{name}.weight"): (heads * head_size, config.hidden_size) for name in HEAD_ROWS}
        expected[model.key(layer, f"{HEAD_COLUMNS}.weight")] = (config.hidden_size, heads * head_size)
        expected[model.key(layer, f"{FFN_ROWS}.weight")] = (width, config.hidden_size)
        expected[model.key(layer, f"{FFN_COLUMNS}.weight")] = (config.hidden_size, width)
        for key, shape in expected.items():
            if key not in state:
                raise ModelFolderError(f"{weights}: no {key}; expected a BERT checkpoint")
            if tuple(state[key].shape) != shape:
                raise ModelFolderError(f"{weights}: {key} has shape {tuple(state[key].shape)} but "
                                       f"{folder / CONFIG_NAME} implies {shape}")
    return model


def _head_rows(heads: Sequence[int], head_size: int) -> torch.Tensor:
    heads = torch.as_tensor(list(heads), dtype=torch.long)
    return (heads[:, None] * head_size + torch.arange(head_size)).reshape(-1)


def _fold_coefficients(model: ModelFolder) -> None:
    """Scale W_O / W2 columns by the slimming coefficients in front of them and drop the coefficients."""
    head_size = model.config.head_size
    for layer in range(model.config.num_hidden_layers):
        for coefficients, columns, repeat in ((HEAD_COEFFICIENTS, HEAD_COLUMNS, head_size),
                                              (NEURON_COEFFICIENTS, FFN_COLUMNS, 1)):
            scale = model.state.pop(model.key(layer, coefficients), None)
            if scale is not None:
                weight = model.state[model.key(layer, f"{columns}.weight")]
                model.state[model.key(layer, f"{columns}.weight")] = (
                    weight.float() * scale.float().repeat_interleave(repeat)).to(weight.dtype)
    model.config.slimming = False


def _moved(tensor: torch.Tensor, dim: int, source: torch.Tensor, target: torch.Tensor, size: int) -> torch.Tensor:
    """A tensor of ``size`` along ``dim``: ``tensor``'s slices ``source`` placed at ``target``, zeros elsewhere."""
    shape = list(tensor.shape)
    shape[dim] = size
    return torch.zeros(shape, dtype=tensor.dtype).index_copy_(dim, target, tensor.index_select(dim, source))


def _relayout(model: ModelFolder, heads: list[tuple[list[int], list[int], int]],
              ffn: list[tuple[list[int], list[int], int]]) -> None:
    """Per layer, move heads / neurons ``source`` -> ``target`` into a layer of the given size (zero-filled)."""
    head_size = model.config.head_size
    for layer, ((head_source, head_target, num_heads), (ffn_source, ffn_target, width)) in enumerate(zip(heads, ffn)):
        moves = [(_head_rows(head_source, head_size), _head_rows(head_target, head_size), num_heads * head_size,
                  HEAD_ROWS, HEAD_COLUMNS),
                 (torch.as_tensor(ffn_source), torch.as_tensor(ffn_target), width, (FFN_ROWS,), FFN_COLUMNS)]
        for source, target, size, row_modules, column_module in moves:
            for module in row_modules:
                for suffix in ("weight", "bias"):
                    key = model.key(layer, f"{module}.{suffix}")
                    model.state[key] = _moved(model.state[key], 0, source, target, size)
            key = model.key(layer, f"{column_module}.weight")
            model.state[key] = _moved(model.state[key], 1, source, target, size)
    model.config.heads_per_layer = [num_heads for _, _, num_heads in heads]
    model.config.ffn_per_layer = [width for _, _, width in ffn]
    model.config.validate()


def _padded_sizes(config: BertConfig) -> tuple[int, int]:
    return config.num_attention_heads, max(config.intermediate_size, *config.ffn_per_layer)


def _export_config(model: ModelFolder, fmt: str, pruned: BertConfig) -> dict:
    """config.json for ``fmt``: the source folder's keys (num_labels, tokenizer ids ...) with the new geometry."""
    values = {key: value for key, value in model.values.items()
              if key not in OUR_CONFIG_KEYS + ("auto_map", PRUNED_GEOMETRY_KEY)}
    values.update(hidden_act="gelu", num_hidden_layers=model.config.num_hidden_layers,
                  num_attention_heads=model.config.num_attention_heads)
    if fmt == "padded":
        values.update(model_type="bert", architectures=[model.architecture],
                      intermediate_size=_padded_sizes(model.config)[1])
        if set(pruned.heads_per_layer) != {pruned.num_attention_heads} or set(pruned.ffn_per_layer) != {
                pruned.intermediate_size}:
            values[PRUNED_GEOMETRY_KEY] = {"heads_per_layer": pruned.heads_per_layer,
                                           "ffn_per_layer": pruned.ffn_per_layer}
    else:
        values.update(model_type=COMPACT_MODEL_TYPE, architectures=[COMPACT_PREFIX + model.architecture],
                      auto_map=AUTO_MAP, intermediate_size=model.config.intermediate_size,
                      heads_per_layer=model.config.heads_per_layer, ffn_per_layer=model.config.ffn_per_layer)
    return values


def _write(model: ModelFolder, out_dir: Path, fmt: str, pruned: BertConfig) -> Path:
    values = _export_config(model, fmt, pruned)
    state = {key: value.detach().contiguous() for key, value in model.state.items()}
    with atomic_folder(out_dir) as staging:
        (staging / CONFIG_NAME).write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
        (staging / SAFETENSORS_NAME).write_bytes(save(state, metadata={"format": "pt"}))  # umask honoured
        copy_tokenizer_files(model.path, staging)
        if fmt == "compact":
            for name in REMOTE_FILES:
                shutil.copyfile(REMOTE_DIR / name, staging / name)
    return out_dir


def _check_output(source: Path, out_dir: str | os.PathLike, fmt: str, overwrite: bool) -> Path:
    """Refuse an output that is, holds or lies inside the input, and one holding anything but an export's files:
    --overwrite replaces only a folder this command wrote (nothing of the user's is ever removed)."""
    out_dir = Path(out_dir)
    if fmt not in FORMATS:
        raise ModelFolderError(f"export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    source_real, out_real = source.resolve(), out_dir.resolve()
    if out_real == source_real or out_real in source_real.parents or source_real in out_real.parents:
        relation = ("is" if out_real == source_real else "holds" if out_real in source_real.parents
                    else "lies inside")
        raise ModelFolderError(f"{out_dir}: the output folder {relation} the input folder {source}; choose a folder "
                               f"apart from it")
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return out_dir
    if not overwrite:
        raise ModelFolderError(f"{out_dir}: already exists and is not empty; pass --overwrite to replace it")
    entries = list(out_dir.iterdir()) if out_dir.is_dir() else []
    foreign = sorted(path.name for path in entries
                     if path.name not in EXPORT_FILES or path.is_symlink() or not path.is_file())
    if foreign or not (out_dir / CONFIG_NAME).is_file():
        listed = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "") if foreign else f"no {CONFIG_NAME}"
        raise ModelFolderError(f"{out_dir}: not a folder this command wrote ({listed}); --overwrite replaces only an "
                               f"export, choose another output folder (nothing was removed)")
    return out_dir


def _place(model: ModelFolder, fmt: str, heads_kept: list[list[int]], ffn_kept: list[list[int]]) -> BertConfig:
    """Lay the kept units out for ``fmt``; returns the pruned geometry (a copy of the config before padding)."""
    pruned = BertConfig.from_dict({**model.config.to_dict(), "heads_per_layer": [len(h) for h in heads_kept],
                                   "ffn_per_layer": [len(f) for f in ffn_kept]})
    if fmt == "padded":  # kept units at the places they are listed at, in the uniform geometry
        num_heads, width = _padded_sizes(model.config)
        _relayout(model, [(kept, kept, num_heads) for kept in heads_kept], [(kept, kept, width) for kept in ffn_kept])
    else:  # only the kept units, packed in order
        _relayout(model, [(kept, list(range(len(kept))), len(kept)) for kept in heads_kept],
                  [(kept, list(range(len(kept))), len(kept)) for kept in ffn_kept])
    return pruned


def export_model(model_dir: str | os.PathLike, out_dir: str | os.PathLike, fmt: str,
                 overwrite: bool = False) -> Path:
    """Write our HF-format folder ``model_dir`` (pruned or not, any task head) as ``fmt`` into ``out_dir``."""
    out = _check_output(Path(model_dir), out_dir, fmt, overwrite)
    model = read_model_folder(model_dir)
    _fold_coefficients(model)
    layers = zip(model.config.heads_per_layer, model.config.ffn_per_layer)
    kept = [(list(range(heads)), list(range(width))) for heads, width in layers]
    pruned = _place(model, fmt, [heads for heads, _ in kept], [ffn for _, ffn in kept])
    return _write(model, out, fmt, pruned)


def apply_ticket(hf_dir: str | os.PathLike, ticket: UnitSelection, out_dir: str | os.PathLike, fmt: str,
                 overwrite: bool = False) -> Path:
    """Prune any HF BERT folder by ``ticket`` and write it as ``fmt``; TicketError (from ``ticket.check_fits``)
    before anything is written when the ticket was drawn for another geometry."""
    out = _check_output(Path(hf_dir), out_dir, fmt, overwrite)
    model = read_model_folder(hf_dir)
    ticket.check_fits(model.config)
    _fold_coefficients(model)
    pruned = _place(model, fmt, ticket.heads_kept, ticket.ffn_kept)
    return _write(model, out, fmt, pruned)
