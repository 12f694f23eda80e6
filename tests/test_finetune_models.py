"""The fine-tuning heads equal transformers' on the same weights, and save / load as HF folders."""

import pytest
import torch
import transformers
from finetune_fixtures import make_tiny_model

from earlybert_pretrain.finetune.models import BertForQuestionAnswering, BertForSequenceClassification
from earlybert_pretrain.tickets.draw import random_ticket
from earlybert_pretrain.tickets.prune import prune


def _inputs(vocab_size: int):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, vocab_size, (3, 11), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, 5:] = 1
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}


@pytest.mark.parametrize("num_labels", [1, 3])
def test_classifier_matches_transformers_and_round_trips(tmp_path, num_labels):
    pretrained = make_tiny_model(tmp_path / "pretrained")
    ours = BertForSequenceClassification.from_pretrained(pretrained, num_labels=num_labels).eval()
    ours.save_pretrained(tmp_path / "finetuned")
    theirs = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "finetuned").eval()
    assert theirs.config.num_labels == num_labels
    inputs = _inputs(ours.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, atol=1e-5, rtol=1e-5)
        reloaded = BertForSequenceClassification.from_pretrained(tmp_path / "finetuned").eval()  # num_labels read
        torch.testing.assert_close(reloaded(**inputs).logits, ours(**inputs).logits, atol=0, rtol=0)
    labels = torch.tensor([0.5, 1.0, 2.0]) if num_labels == 1 else torch.tensor([0, 2, 1])
    hf_loss = theirs(**inputs, labels=labels).loss
    torch.testing.assert_close(ours(**inputs, labels=labels).loss, hf_loss, atol=1e-5, rtol=1e-5)


def test_question_answering_matches_transformers(tmp_path):
    pretrained = make_tiny_model(tmp_path / "pretrained")
    ours = BertForQuestionAnswering.from_pretrained(pretrained).eval()
    ours.save_pretrained(tmp_path / "qa")
    theirs = transformers.BertForQuestionAnswering.from_pretrained(tmp_path / "qa").eval()
    inputs = _inputs(ours.config.vocab_size)
    starts, ends = torch.tensor([1, 2, 3]), torch.tensor([2, 4, 3])
    with torch.no_grad():
        output = theirs(**inputs, start_positions=starts, end_positions=ends)
        mine = ours(**inputs, start_positions=starts, end_positions=ends)
    torch.testing.assert_close(mine.logits[..., 0], output.start_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine.logits[..., 1], output.end_logits, atol=1e-5, rtol=1e-5)
    # Our loss leaves padding out of the softmax (transformers' does not): equal on the unpadded rows, and on the
    # padded row equal to transformers' logits with the padding masked.
    padding = inputs["attention_mask"] == 0
    start = output.start_logits.masked_fill(padding, float("-inf"))
    end = output.end_logits.masked_fill(padding, float("-inf"))
    expected = (torch.nn.functional.cross_entropy(start, starts) + torch.nn.functional.cross_entropy(end, ends)) / 2
    torch.testing.assert_close(mine.loss, expected, atol=1e-5, rtol=1e-5)
    assert abs(mine.loss - output.loss) > 1e-3  # the padded row does change transformers' loss


def test_pruned_classifier_keeps_its_head_and_reloads(tmp_path):
    model = BertForSequenceClassification.from_pretrained(make_tiny_model(tmp_path / "p"), num_labels=3).eval()
    ticket = random_ticket(model.config, heads_to_prune=1, ffn_ratio=0.4, seed=1)
    pruned = prune(model, ticket).eval()
    assert isinstance(pruned, BertForSequenceClassification) and pruned.num_labels == 3
    assert pruned.config.heads_per_layer == [3, 3]
    pruned.save_pretrained(tmp_path / "pruned")
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path / "pruned").eval()
    inputs = _inputs(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, pruned(**inputs).logits, atol=0, rtol=0)
