"""Load and save HF-format model folders (config.json + model.safetensors), uneven per-layer geometry included.

A folder written here loads in transformers too when its geometry is uniform; a pruned one records
``heads_per_layer`` / ``ffn_per_layer`` in config.json, which only our loader reads. Plain ``BertModel`` checkpoints
(no ``bert.`` prefix, no MLM/NSP heads) load with freshly initialised heads and a warning that lists them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from earlybert_pretrain.common.files import atomic_folder, read_json
from earlybert_pretrain.errors import ModelFolderError
from earlybert_pretrain.model.bert import BertConfig, BertPreTrainedModel

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# The decoder weight is the word-embedding matrix and its bias is cls.predictions.bias: stored once, under HF names.
TIED_KEYS = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
# Older transformers checkpoints store these index buffers; they are recomputed, not learned.
INDEX_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def read_config(folder: str | os.PathLike) -> BertConfig:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise ModelFolderError(f"{folder}: no {CONFIG_NAME} in this folder; expected an HF-format model folder")
    values = read_json(path, "model config", ModelFolderError)
    if not isinstance(values, dict):
        raise ModelFolderError(f"{path}: expected a JSON object of BERT config fields")
    act = values.get("hidden_act", "gelu")
    if act != "gelu":
        raise ModelFolderError(f"{path}: hidden_act={act!r} is not supported; expected 'gelu' (exact erf GELU)")
    try:
        return BertConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        raise ModelFolderError(f"{path}: {err}") from None


def read_state_dict(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Path]:
    folder = Path(folder)
    for name, loader in ((SAFETENSORS_NAME, load_file),
                         (TORCH_WEIGHTS_NAME, lambda p: torch.load(p, map_location="cpu", weights_only=True))):
        path = folder / name
        if path.is_file():
            try:
                return loader(str(path)), path
            except Exception as err:  # corrupt or truncated weights: name the file, not the library internals
                raise ModelFolderError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from None
    raise ModelFolderError(f"{folder}: no weights; expected {SAFETENSORS_NAME} or {TORCH_WEIGHTS_NAME}")


def _normalise_keys(state: dict[str, torch.Tensor], model: BertPreTrainedModel) -> dict[str, torch.Tensor]:
    """Map a bare BertModel checkpoint ('embeddings.*') onto a model that holds it under 'bert.'."""
    expected = model.state_dict().keys()
    prefixed = any(key.startswith("bert.") for key in expected)
    has_prefix = any(key.startswith("bert.") for key in state)
    if prefixed and not has_prefix:
        return {f"bert.{key}": value for key, value in state.items()}
    if not prefixed and has_prefix:
        return {key[len("bert."):]: value for key, value in state.items() if key.startswith("bert.")}
    return state


def load_pretrained(model_class: type[BertPreTrainedModel], folder: str | os.PathLike,
                    **config_overrides) -> BertPreTrainedModel:
    """Build ``model_class`` from ``folder``; ``config_overrides`` (e.g. dropout, slimming) change the config."""
    config = read_config(folder)
    for key, value in config_overrides.items():
        if not hasattr(config, key):
            raise TypeError(f"load_pretrained: unknown BertConfig field {key!r}")
        setattr(config, key, value)
    config.validate()
    model = model_class(config)
    state, weights_path = read_state_dict(folder)
    state = _normalise_keys({k: v for k, v in state.items() if not k.endswith(INDEX_BUFFERS)}, model)
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key in state and state[key].shape != tensor.shape:
            raise ModelFolderError(
                f"{weights_path}: {key} has shape {tuple(state[key].shape)} but {Path(folder) / CONFIG_NAME} implies "
                f"{tuple(tensor.shape)}")
    coefficient_keys = {key for key in expected if key.endswith(("head_coefficients", "neuron_coefficients"))}
    missing = [key for key in expected if key not in state and key not in TIED_KEYS and key not in coefficient_keys]
    unexpected = [key for key in state if key not in expected]
    if unexpected:
        logger.warning("%s: ignored %d weights this model does not have: %s", weights_path, len(unexpected),
                       ", ".join(sorted(unexpected)))
    if missing:
        logger.warning("%s: %d weights not in the checkpoint were freshly initialised: %s", weights_path,
                       len(missing), ", ".join(sorted(missing)))
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return model


def save_pretrained(model: BertPreTrainedModel, folder: str | os.PathLike, architecture: str | None = None) -> None:
    """config.json (per-layer geometry included) + model.safetensors; reloadable with identical outputs."""
    config = model.config.to_dict()
    config.update(model_type="bert", hidden_act="gelu",
                  architectures=[architecture or type(model).__name__])
    # Saved models are fp32 whatever the training precision: half precision never decides what is kept.
    state = {key: (value.float() if value.is_floating_point() else value).detach().contiguous().cpu()
             for key, value in model.state_dict().items() if key not in TIED_KEYS}

    folder = Path(folder)
    with atomic_folder(folder) as staging:  # a crash never leaves half a model
        if folder.is_dir():  # keep files we do not own (tokenizer, notes) that are already there
            for item in folder.iterdir():
                if item.is_file() and item.name not in (CONFIG_NAME, SAFETENSORS_NAME, TORCH_WEIGHTS_NAME):
                    shutil.copy2(item, staging / item.name)
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        # Bytes written by us, not save_file: safetensors creates its files 0o600 whatever the umask says.
        (staging / SAFETENSORS_NAME).write_bytes(save(state, metadata={"format": "pt"}))


def copy_tokenizer_files(source: str | os.PathLike, destination: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files that exist in ``source`` next to a saved model; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        path = Path(source) / name
        if path.is_file():
            shutil.copy2(path, Path(destination) / name)
            copied.append(name)
    return copied
