"""Tokenizer from a model folder and model inputs for the classification / regression tasks.

Every example is encoded once into ``input_ids`` / ``token_type_ids`` (truncated to ``max_seq_length``, longest
sequence first as in BERT's run_classifier); batches are padded to their own longest row, which keeps a step's work
proportional to its real tokens.
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets
import torch

from earlybert_pretrain.errors import ModelFolderError
from earlybert_pretrain.finetune.tasks import TaskSpec


class MissingTokenizerError(ModelFolderError):
    """The model folder has neither tokenizer.json nor vocab.txt."""


def load_tokenizer(folder: str | os.PathLike):
    """The fast BERT tokenizer of ``folder`` (tokenizer.json, or built from vocab.txt; lower-casing as configured)."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.txt").is_file():
        raise MissingTokenizerError(f"{folder}: no tokenizer; expected tokenizer.json or vocab.txt in the model "
                                    "folder (copy the tokenizer files of the checkpoint you started from)")
    from transformers import BertTokenizerFast  # imported here: transformers is slow to import

    return BertTokenizerFast.from_pretrained(str(folder))


def encode_classification(dataset: datasets.Dataset, task: TaskSpec, tokenizer,
                          max_seq_length: int) -> datasets.Dataset:
    """Add ``input_ids`` / ``token_type_ids`` for one split; keeps ``label``."""
    columns = [list(dataset[name]) for name in task.text_columns]
    encoded = tokenizer(*columns, truncation=True, max_length=max_seq_length, return_attention_mask=False)
    return datasets.Dataset.from_dict({"input_ids": encoded["input_ids"], "token_type_ids": encoded["token_type_ids"],
                                       "label": list(dataset["label"])})


def pad_batch(rows: list[dict], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad ``input_ids`` / ``token_type_ids`` to the longest row; other numeric fields become tensors as they are."""
    length = max(len(row["input_ids"]) for row in rows)
    batch = {}
    for name, pad in (("input_ids", pad_token_id), ("token_type_ids", 0)):
        batch[name] = torch.tensor([row[name] + [pad] * (length - len(row[name])) for row in rows])
    batch["attention_mask"] = torch.tensor([[1] * len(row["input_ids"]) + [0] * (length - len(row["input_ids"]))
                                            for row in rows])
    for name in rows[0]:
        if name not in batch and isinstance(rows[0][name], int | float):
            batch[name] = torch.tensor([row[name] for row in rows])
    return batch
