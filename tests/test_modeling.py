"""BertForPreTraining against transformers' implementation: same parameters, same outputs, same losses."""

import pytest
import torch
import transformers

from earlybert_pretrain.model.bert import (
    BertConfig,
    BertForPreTraining,
    BertModel,
    flops_per_token,
    parameter_counts,
)

# (hidden, layers, heads, ffn): hidden 48 and 36 are not powers of two; 36 / 3 heads gives an odd-ish head size 12.
GEOMETRIES = [(32, 2, 4, 64), (48, 3, 6, 70), (36, 2, 3, 50)]
VOCAB = 97


def hf_model(hidden, layers, heads, ffn, seed=0, **extra) -> transformers.BertForPreTraining:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=40,
                                     **extra)
    return transformers.BertForPreTraining(config).eval()


def ours_from(reference: transformers.BertForPreTraining, **overrides) -> BertForPreTraining:
    config = BertConfig.from_hf(reference.config)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = BertForPreTraining(config).eval()
    result = model.load_state_dict(reference.state_dict(), strict=not config.slimming)
    if config.slimming:  # only the coefficients are absent from the transformers state dict
        assert set(result.missing_keys) == {k for k in model.state_dict() if k.endswith("coefficients")}
        assert not result.unexpected_keys
    return model


def padded_batch(seed=1, batch=4, seq=19):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (batch, seq), generator=generator)
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, seq // 2:] = 1
    attention_mask = torch.ones_like(input_ids)
    for row, length in enumerate([seq, seq - 5, 7, 3][:batch]):
        attention_mask[row, length:] = 0
        input_ids[row, length:] = 0
    return input_ids, token_type_ids, attention_mask


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_matches_transformers_on_padded_batches(geometry):
    reference = hf_model(*geometry)
    ours = ours_from(reference)
    ids, types, mask = padded_batch()
    with torch.no_grad():
        expected = reference(input_ids=ids, token_type_ids=types, attention_mask=mask)
        got = ours(ids, types, mask)
    assert got.prediction_logits.shape == expected.prediction_logits.shape
    assert max_diff(got.prediction_logits, expected.prediction_logits) <= 1e-5
    assert max_diff(got.seq_relationship_logits, expected.seq_relationship_logits) <= 1e-5


def test_parameter_names_and_tied_decoder():
    reference = hf_model(*GEOMETRIES[0])
    ours = ours_from(reference)
    assert list(ours.state_dict()) == list(reference.state_dict())
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    assert ours.cls.predictions.decoder.bias is ours.cls.predictions.bias


def test_losses_match_transformers_dense_cross_entropy():
    reference = hf_model(*GEOMETRIES[1], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ours = ours_from(reference)
    ids, types, mask = padded_batch(seed=3)
    labels = torch.full_like(ids, -100)
    labels[0, [1, 4, 9]] = ids[0, [1, 4, 9]]
    labels[2, 2] = 5
    nsp = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        expected = reference(input_ids=ids, token_type_ids=types, attention_mask=mask, labels=labels,
                             next_sentence_label=nsp)
        got = ours(ids, types, mask, labels=labels, next_sentence_label=nsp)
    assert got.prediction_logits.shape == (4, VOCAB)  # masked positions only
    assert abs(got.loss.item() - expected.loss.item()) <= 1e-5
    dense_mlm = torch.nn.functional.cross_entropy(expected.prediction_logits.view(-1, VOCAB), labels.view(-1))
    assert abs(got.mlm_loss.item() - dense_mlm.item()) <= 1e-5
    assert abs(got.loss.item() - (got.mlm_loss + got.nsp_loss).item()) <= 1e-6


def test_sparse_loss_gradients_match_dense_loss():
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertForPreTraining(config)
    ids, types, mask = padded_batch(seed=5)
    labels = torch.full_like(ids, -100)
    labels[1, [0, 3]] = torch.tensor([7, 8])
    model(ids, types, mask, labels=labels).mlm_loss.backward()
    sparse_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    logits = model(ids, types, mask).prediction_logits
    torch.nn.functional.cross_entropy(logits.view(-1, VOCAB), labels.view(-1)).backward()
    dense_grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert sparse_grads.keys() == dense_grads.keys() and "bert.encoder.layer.0.output.dense.weight" in dense_grads
    for name, grad in dense_grads.items():
        assert torch.allclose(sparse_grads[name], grad, atol=1e-6), name


def test_batch_without_masked_tokens_gives_zero_mlm_loss_and_finite_gradients():
    model = BertForPreTraining(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=4, intermediate_size=40))
    ids, types, mask = padded_batch()
    out = model(ids, types, mask, labels=torch.full_like(ids, -100), next_sentence_label=torch.tensor([0, 1, 0, 1]))
    assert out.mlm_loss.item() == 0.0
    assert out.prediction_logits.shape == (0, VOCAB)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.allclose(out.loss, out.nsp_loss)


def test_slimming_coefficients_at_one_change_nothing():
    reference = hf_model(*GEOMETRIES[1])
    dense, slim = ours_from(reference), ours_from(reference, slimming=True)
    kinds = [(kind, layer, coefficient.numel()) for kind, layer, coefficient in slim.slimming_coefficients()]
    assert kinds == [(kind, layer, n) for layer in range(3) for kind, n in (("head", 6), ("ffn", 70))]
    assert all(torch.equal(c, torch.ones_like(c)) for _, _, c in slim.slimming_coefficients())
    ids, types, mask = padded_batch()
    with torch.no_grad():
        assert max_diff(slim(ids, types, mask).prediction_logits, dense(ids, types, mask).prediction_logits) == 0.0


def test_zero_head_coefficient_equals_zeroed_w_o_columns_in_transformers():
    reference = hf_model(*GEOMETRIES[1])
    slim = ours_from(reference, slimming=True)
    head_size = 48 // 6
    layer, head = 1, 4
    with torch.no_grad():
        slim.bert.encoder.layer[layer].attention.self.head_coefficients[head] = 0.0
        w_o = reference.bert.encoder.layer[layer].attention.output.dense.weight
        w_o[:, head * head_size:(head + 1) * head_size] = 0
    ids, types, mask = padded_batch()
    with torch.no_grad():
        expected = reference(input_ids=ids, token_type_ids=types, attention_mask=mask)
        got = slim(ids, types, mask)
    assert max_diff(got.prediction_logits, expected.prediction_logits) <= 1e-5
    assert max_diff(got.seq_relationship_logits, expected.seq_relationship_logits) <= 1e-5


def test_zero_ffn_coefficient_equals_zeroed_w2_column_in_transformers():
    reference = hf_model(*GEOMETRIES[2])
    slim = ours_from(reference, slimming=True)
    with torch.no_grad():
        for layer, neurons in ((0, [3, 17, 49]), (1, [0])):
            slim.bert.encoder.layer[layer].intermediate.neuron_coefficients[neurons] = 0.0
            reference.bert.encoder.layer[layer].output.dense.weight[:, neurons] = 0.0
        # A coefficient of 0.5 scales the neuron's activation: the same as halving its W2 column.
        slim.bert.encoder.layer[1].intermediate.neuron_coefficients[7] = 0.5
        reference.bert.encoder.layer[1].output.dense.weight[:, 7] *= 0.5
    ids, types, mask = padded_batch()
    with torch.no_grad():
        expected = reference(input_ids=ids, token_type_ids=types, attention_mask=mask)
        got = slim(ids, types, mask)
    assert max_diff(got.prediction_logits, expected.prediction_logits) <= 1e-5


def test_add_slimming_coefficients_keeps_function_and_trains_them():
    model = BertForPreTraining(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=40)).eval()
    ids, types, mask = padded_batch()
    with torch.no_grad():
        before = model(ids, types, mask).prediction_logits
    model.add_slimming_coefficients()
    assert model.config.slimming
    assert len(list(model.slimming_coefficients())) == 4
    with torch.no_grad():
        assert torch.equal(model(ids, types, mask).prediction_logits, before)
    model(ids, types, mask).prediction_logits.sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for _, _, c in model.slimming_coefficients())


def test_uneven_geometry_shapes_and_parameter_counts():
    config = BertConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                        intermediate_size=70, heads_per_layer=[6, 1, 4], ffn_per_layer=[70, 5, 33], slimming=True)
    model = BertForPreTraining(config)
    layer = model.bert.encoder.layer[1]
    assert layer.attention.self.query.weight.shape == (8, 48)
    assert layer.attention.output.dense.weight.shape == (48, 8)
    assert layer.intermediate.dense.weight.shape == (5, 48)
    assert layer.output.dense.weight.shape == (48, 5)
    counts = parameter_counts(config)
    assert counts["total"] == model.num_parameters()
    assert counts["slimming"] == 11 + 108
    ids, types, mask = padded_batch()
    assert model(ids, types, mask).prediction_logits.shape == (4, 19, VOCAB)


def test_bert_base_flops_per_token_match_the_rule_of_thumb():
    """6 * N_non-embedding + 12 * L * d * T, plus the MLM head on masked positions (FACTS: ~0.55 GFLOP at 128)."""
    config = BertConfig()
    counts = parameter_counts(config)
    non_embedding = counts["attention"] + counts["ffn"]
    rule = 6 * non_embedding + 12 * 12 * 768 * 128
    by_component = flops_per_token(config, 128, by_component=True)
    assert abs(by_component["attention"] + by_component["ffn"] - rule) / rule < 0.01
    assert 0.53e9 < flops_per_token(config, 128) < 0.56e9
    assert 0.66e9 < flops_per_token(config, 128, masked_fraction=1.0) < 0.68e9
    # Pruning a third of the heads and 30% of FFN removes FLOPs accordingly.
    pruned = BertConfig(heads_per_layer=[8] * 12, ffn_per_layer=[2150] * 12)
    assert flops_per_token(pruned, 128) < 0.8 * flops_per_token(config, 128)


def test_bert_model_without_pooler_returns_sequence_output():
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=40)
    sequence_output, pooled = BertModel(config, add_pooler=False)(torch.randint(1, VOCAB, (2, 5)))
    assert sequence_output.shape == (2, 5, 32) and pooled is None


@pytest.mark.parametrize("fields, message", [
    (dict(heads_per_layer=[4, 4, 4]), "heads_per_layer has 3 entries, expected one per layer"),
    (dict(ffn_per_layer=[8]), "ffn_per_layer has 1 entries"),
    (dict(heads_per_layer=[4, 5]), r"heads_per_layer\[1\] = 5, expected 1..num_attention_heads"),
    (dict(heads_per_layer=[0, 4]), r"heads_per_layer\[0\] = 0"),
    (dict(ffn_per_layer=[8, 0]), r"ffn_per_layer\[1\] = 0"),
    (dict(hidden_size=30), r"hidden_size \(30\) must be divisible by num_attention_heads \(4\)"),
])
def test_bad_geometry_is_refused_with_the_field_named(fields, message):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=8)
    with pytest.raises(ValueError, match=message):
        BertConfig(**{**base, **fields})


def test_from_hf_refuses_other_activations():
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        BertConfig.from_hf(transformers.BertConfig(hidden_act="relu"))
