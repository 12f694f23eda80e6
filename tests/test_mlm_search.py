"""Fine-tuning's search on the MLM objective (paper Appendix B, Table 8): the task's own text masked by BERT's rule,
the model's MLM head trained with the slimming coefficients (freshly initialised when the folder has none), a ticket
drawn with the search settings' counts, and the fine-tuning continuing from it."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from finetune_fixtures import TINY_CONFIG, VOCAB, make_tiny_model, sentiment_rows, write_jsonl

from earlybert_pretrain.common.tokens import IGNORE_INDEX
from earlybert_pretrain.finetune.cli import main
from earlybert_pretrain.finetune.features import load_tokenizer
from earlybert_pretrain.finetune.trainer import MlmMasking, _has_mlm_head
from earlybert_pretrain.model.bert import BertConfig, BertModel
from earlybert_pretrain.model.hf import read_config, save_pretrained
from earlybert_pretrain.tickets.ticket import Ticket


def bare_encoder(folder: Path) -> Path:
    """A tiny BertModel folder without MLM head weights (as the MiniLM checkpoint ships)."""
    torch.manual_seed(0)
    save_pretrained(BertModel(BertConfig(**TINY_CONFIG)), folder)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return folder


def test_masking_follows_berts_rule_on_real_tokens_only(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(make_tiny_model(tmp_path / "model"))
    encoded = tokenizer(["the film was very good and the plot was lovely"] * 64, padding="max_length", max_length=16)
    batch = {name: torch.tensor(values) for name, values in encoded.items()}
    masking = MlmMasking(tokenizer, seed=1, rank=0, device=torch.device("cpu"))
    inputs = masking(batch, index=3)
    assert torch.equal(inputs["input_ids"], masking(batch, index=3)["input_ids"])  # a function of (seed, index)
    labels, original = inputs["labels"], batch["input_ids"]
    masked = labels != IGNORE_INDEX
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    assert not (masked & special).any() and not (masked & (batch["attention_mask"] == 0)).any()
    real = int(batch["attention_mask"][0].sum())
    assert (masked.sum(dim=1) == max(1, round(real * 0.15))).all()
    assert torch.equal(labels[masked], original[masked])
    assert torch.equal(inputs["input_ids"][~masked], original[~masked])  # only chosen positions change
    share_mask = (inputs["input_ids"][masked] == tokenizer.mask_token_id).float().mean().item()
    assert 0.65 < share_mask < 0.95  # ~80% [MASK] of 128 masked positions


def test_a_folder_without_mlm_head_weights_is_told_apart(tmp_path: Path) -> None:
    assert _has_mlm_head(str(make_tiny_model(tmp_path / "full")))
    assert not _has_mlm_head(str(bare_encoder(tmp_path / "bare")))


@pytest.mark.slow
def test_mlm_search_draws_a_ticket_and_the_finetuning_continues_from_it(tmp_path: Path, caplog) -> None:
    model = bare_encoder(tmp_path / "model")  # the head is initialised for the search, and the log says so
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(64, 0))
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="earlybert_pretrain"):
        assert main(["--task", "sst2", "--model", str(model), "--mode", "earlybert", f"output_dir={out}",
                     f"data.train_file={train}", f"data.validation_files=[{train}]", "batch_size=16",
                     "search.objective=mlm", "search.steps=6", "search.record_every=2", "search.heads_to_prune=1",
                     "search.ffn_ratio=0.5", "search.ffn_multiple_of=1", "search.lr=1e-3", "lr=1e-3"]) == 0
    assert any("MLM search" in r.getMessage() and "freshly initialised" in r.getMessage() for r in caplog.records)
    metrics = json.loads((out / "metrics.json").read_text())
    ticket = Ticket.load(out / "ticket.json")
    assert [len(kept) for kept in ticket.heads_kept] == [3, 3]  # 1 of 4 heads pruned per layer
    assert sum(len(kept) for kept in ticket.ffn_kept) == 64  # 50% of 2 x 64 neurons, globally
    assert metrics["search"]["steps"] == 6 and metrics["time"]["search"]["steps"] == 6
    # The search trained masked-LM over a 57-token vocab (a loss near ln 57 ~ 4), not the 2-class task (ln 2).
    search_losses = metrics["losses"]["search"]
    assert all(math.isfinite(loss) for loss in search_losses) and search_losses[0] > 2.5
    assert metrics["losses"]["finetune"][0] < 1.5
    geometry = read_config(out / "model")
    assert (geometry.heads_per_layer, geometry.ffn_per_layer) == (
        [len(kept) for kept in ticket.heads_kept], [len(kept) for kept in ticket.ffn_kept])
    assert metrics["model_geometry"]["heads_per_layer"] == [3, 3]
    assert np.isfinite(metrics["scores"]["validation"]["accuracy"])
