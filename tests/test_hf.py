"""HF-format folders: save/load round trips, uneven geometry, a real pretrained checkpoint, and bad folders."""

import json
import logging

import pytest
import torch
import transformers
from minilm import MINILM, needs_minilm
from safetensors.torch import save_file

from earlybert_pretrain.model.bert import BertConfig, BertForPreTraining, BertModel
from earlybert_pretrain.model.hf import load_pretrained, save_pretrained

SENTENCES = [
    "The lottery ticket hypothesis says that dense networks contain sparse subnetworks.",
    "Anarchism is a political philosophy that is skeptical of authority.",
    "Paris is the capital of France.",
]


def tiny_uneven(slimming=False) -> BertForPreTraining:
    torch.manual_seed(0)
    return BertForPreTraining(BertConfig(vocab_size=61, hidden_size=40, num_hidden_layers=3, num_attention_heads=5,
                                         intermediate_size=64, max_position_embeddings=32, heads_per_layer=[5, 2, 3],
                                         ffn_per_layer=[64, 9, 31], slimming=slimming)).eval()


def batch():
    ids = torch.randint(1, 61, (2, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, torch.zeros_like(ids), mask


def test_round_trip_with_uneven_geometry_gives_identical_outputs(tmp_path):
    model = tiny_uneven(slimming=True)
    with torch.no_grad():
        model.bert.encoder.layer[2].intermediate.neuron_coefficients.uniform_(0, 2)
    save_pretrained(model, tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["heads_per_layer"] == [5, 2, 3] and saved["ffn_per_layer"] == [64, 9, 31]
    assert saved["architectures"] == ["BertForPreTraining"]
    reloaded = load_pretrained(BertForPreTraining, tmp_path / "model").eval()
    assert reloaded.config == model.config
    ids, types, mask = batch()
    with torch.no_grad():
        expected, got = model(ids, types, mask), reloaded(ids, types, mask)
    assert torch.equal(expected.prediction_logits, got.prediction_logits)
    assert torch.equal(expected.seq_relationship_logits, got.seq_relationship_logits)
    assert reloaded.cls.predictions.decoder.weight is reloaded.bert.embeddings.word_embeddings.weight
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging folder left behind


def test_uniform_folder_loads_in_transformers_too(tmp_path):
    torch.manual_seed(1)
    model = BertForPreTraining(BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=48)).eval()
    save_pretrained(model, tmp_path)
    reference = transformers.BertForPreTraining.from_pretrained(tmp_path).eval()
    ids, types, mask = batch()
    with torch.no_grad():
        expected = reference(input_ids=ids, token_type_ids=types, attention_mask=mask).prediction_logits
        assert (model(ids, types, mask).prediction_logits - expected).abs().max() <= 1e-5


def test_saving_over_an_existing_folder_keeps_tokenizer_files(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    save_pretrained(tiny_uneven(), tmp_path)
    save_pretrained(tiny_uneven(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]


@needs_minilm
def test_real_pretrained_checkpoint_matches_transformers_bert_model(caplog):
    tokenizer = transformers.BertTokenizerFast.from_pretrained(MINILM)
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    reference = transformers.BertModel.from_pretrained(MINILM).eval()
    with caplog.at_level(logging.WARNING):
        ours = load_pretrained(BertForPreTraining, MINILM).eval()
    # A bare BertModel checkpoint: the MLM/NSP heads are initialised and the warning lists them.
    assert "cls.predictions.transform.dense.weight" in caplog.text and "cls.seq_relationship.weight" in caplog.text
    assert "embeddings.position_ids" not in caplog.text
    with torch.no_grad():
        expected = reference(**encoded).last_hidden_state
        got, _ = ours.bert(encoded["input_ids"], encoded["token_type_ids"], encoded["attention_mask"])
    real = encoded["attention_mask"].bool()
    assert (got[real] - expected[real]).abs().max() <= 1e-5
    # The same checkpoint as a bare encoder (no "bert." prefix on either side).
    encoder = load_pretrained(BertModel, MINILM).eval()
    with torch.no_grad():
        assert torch.equal(encoder(encoded["input_ids"])[0], ours.bert(encoded["input_ids"])[0])


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_pretrained(BertForPreTraining, tmp_path)


def test_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_uneven().config.to_dict()))
    with pytest.raises(ValueError, match="no weights; expected model.safetensors or pytorch_model.bin"):
        load_pretrained(BertForPreTraining, tmp_path)


def test_shapes_that_disagree_with_the_config_are_refused(tmp_path):
    model = tiny_uneven()
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["ffn_per_layer"] = [64, 10, 31]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model.safetensors: bert.encoder.layer.1.intermediate.dense.weight has "
                                         r"shape \(9, 40\) but .*config.json implies \(10, 40\)"):
        load_pretrained(BertForPreTraining, tmp_path)


def test_corrupt_weights_and_bad_config_name_the_file(tmp_path):
    save_pretrained(tiny_uneven(), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors: cannot read weights"):
        load_pretrained(BertForPreTraining, tmp_path)
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_pretrained(BertForPreTraining, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "heads_per_layer": [12]}))
    with pytest.raises(ValueError, match="config.json: BertConfig.heads_per_layer has 1 entries"):
        load_pretrained(BertForPreTraining, tmp_path)


def test_pytorch_bin_weights_load(tmp_path):
    model = tiny_uneven()
    save_pretrained(model, tmp_path)
    state = {k: v for k, v in model.state_dict().items()}
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    reloaded = load_pretrained(BertForPreTraining, tmp_path).eval()
    ids, types, mask = batch()
    with torch.no_grad():
        assert torch.equal(reloaded(ids, types, mask).prediction_logits, model(ids, types, mask).prediction_logits)


def test_partial_checkpoint_loads_what_it_has(tmp_path):
    """A checkpoint holding only some encoder weights loads them and initialises the rest (listed)."""
    model = tiny_uneven()
    save_pretrained(model, tmp_path)
    partial = {k: v.contiguous() for k, v in model.state_dict().items() if k.startswith("bert.embeddings.")}
    save_file(partial, str(tmp_path / "model.safetensors"))
    reloaded = load_pretrained(BertForPreTraining, tmp_path)
    assert torch.equal(reloaded.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight)
