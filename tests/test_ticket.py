"""Tickets: drawing, random baseline, persistence, mask distances, early-bird detection, physical pruning."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from earlybert_pretrain.model.bert import BertConfig, BertForPreTraining, BertModel, BertPreTrainedModel
from earlybert_pretrain.model.hf import load_pretrained, save_pretrained
from earlybert_pretrain.tickets.distance import EarlyBirdDetector, mask_distance
from earlybert_pretrain.tickets.draw import draw_ticket, gather_coefficients, l1_penalty, random_ticket
from earlybert_pretrain.tickets.history import MaskHistory
from earlybert_pretrain.tickets.prune import prune
from earlybert_pretrain.tickets.report import render_report, ticket_report
from earlybert_pretrain.tickets.ticket import Ticket, TicketError, geometry_of


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is faster than two, and far faster when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL = dict(vocab_size=50, max_position_embeddings=32)
GEOMETRIES = {
    "uniform-4x32": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64),
    "uniform-3x24": dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=40),
    "uneven-source": dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=48,
                          heads_per_layer=[6, 4], ffn_per_layer=[48, 30]),
}


def make_config(name: str, **overrides) -> BertConfig:
    return BertConfig(**{**SMALL, **GEOMETRIES[name], **overrides})


def make_model(config: BertConfig, seed: int = 0, cls=BertForPreTraining) -> BertPreTrainedModel:
    """Random weights and random (non-unit, layer-dependent) slimming coefficients, in eval mode."""
    torch.manual_seed(seed)
    model = cls(config)
    if not isinstance(model, BertForPreTraining):
        model.init_weights()
    model.add_slimming_coefficients()
    with torch.no_grad():
        for _, layer, coefficients in model.slimming_coefficients():
            coefficients.uniform_(0.1, 2.0).mul_(1.0 - 0.2 * layer)
    return model.eval()


def zero_dropped_coefficients(model: BertPreTrainedModel, ticket: Ticket) -> BertPreTrainedModel:
    """The reference for pruning: the dense model with the dropped units' coefficients set to 0."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for kind, layer, coefficients in reference.slimming_coefficients():
            keep = torch.zeros_like(coefficients)
            keep[(ticket.heads_kept if kind == "head" else ticket.ffn_kept)[layer]] = 1.0
            coefficients.mul_(keep)
    return reference


def sample_batch(config: BertConfig, batch: int = 3, seq: int = 12, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, config.vocab_size, (batch, seq), generator=generator)
    token_type_ids = (torch.arange(seq) >= seq // 2).long().expand(batch, seq)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[1, seq - 4:] = 0  # padding must be handled the same way
    return input_ids, token_type_ids, attention_mask


def uneven_tickets(config: BertConfig, model: BertPreTrainedModel) -> list[Ticket]:
    """A drawn global-FFN ticket, a layer-wise one, and a hand-made ticket with different counts per layer."""
    hand_heads = [[h for h in range(n) if h % (layer + 2)] or [0] for layer, n in enumerate(config.heads_per_layer)]
    hand_ffn = [list(range(0, n, layer + 2)) for layer, n in enumerate(config.ffn_per_layer)]
    return [draw_ticket(model, heads_to_prune=1, ffn_ratio=0.4),
            draw_ticket(model, heads_to_prune=0.5, ffn_ratio=0.3, ffn_scope="layerwise"),
            Ticket(heads_kept=hand_heads, ffn_kept=hand_ffn, source_geometry=geometry_of(config))]


# --- physical pruning -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_pruned_model_equals_dense_with_dropped_coefficients_zeroed(geometry):
    config = make_config(geometry)
    model = make_model(config)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    inputs = sample_batch(config)
    for ticket in uneven_tickets(config, model):
        pruned = prune(model, ticket)
        with torch.no_grad():
            expected = zero_dropped_coefficients(model, ticket)(*inputs)
            actual = pruned(*inputs)
        torch.testing.assert_close(actual.prediction_logits, expected.prediction_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(actual.seq_relationship_logits, expected.seq_relationship_logits,
                                   atol=1e-5, rtol=0)
        assert pruned.config.heads_per_layer == [len(kept) for kept in ticket.heads_kept]
        assert pruned.config.ffn_per_layer == [len(kept) for kept in ticket.ffn_kept]
        assert not pruned.config.slimming and list(pruned.slimming_coefficients()) == []
        assert pruned.config is pruned.bert.config and pruned.config is not model.config
        # Physically smaller: the actual tensors shrink, not just a mask.
        layer0 = pruned.encoder_layers()[0]
        assert layer0.attention.self.query.weight.shape[0] == len(ticket.heads_kept[0]) * config.head_size
        assert layer0.attention.output.dense.weight.shape[1] == len(ticket.heads_kept[0]) * config.head_size
        assert layer0.output.dense.weight.shape[1] == len(ticket.ffn_kept[0])
    # The input model is untouched.
    assert model.config.heads_per_layer == config.heads_per_layer and model.config.slimming
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("geometry", ["uniform-4x32", "uniform-3x24"])
def test_pruned_model_equals_transformers_with_zeroed_columns(geometry):
    """transformers' BERT is the independent implementation: drop a head by zeroing its W_O input columns, a neuron
    by zeroing its W2 column; the surviving coefficients scale the same columns (Eq. 2-3)."""
    transformers = pytest.importorskip("transformers")
    config = make_config(geometry)
    model = make_model(config, seed=3)
    hf_config = transformers.BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings, hidden_act="gelu", attn_implementation="eager")
    coefficients = gather_coefficients(model)
    inputs = sample_batch(config, seed=4)
    for ticket in uneven_tickets(config, model):
        hf_model = transformers.BertForPreTraining(hf_config).eval()
        state = {k: v for k, v in model.state_dict().items() if not k.endswith("coefficients")}
        hf_model.load_state_dict(state, strict=True)
        with torch.no_grad():
            for index, hf_layer in enumerate(hf_model.bert.encoder.layer):
                head_scale = torch.zeros(config.num_attention_heads)
                head_scale[ticket.heads_kept[index]] = coefficients["head"][index][ticket.heads_kept[index]]
                hf_layer.attention.output.dense.weight.mul_(head_scale.repeat_interleave(config.head_size))
                neuron_scale = torch.zeros(config.intermediate_size)
                neuron_scale[ticket.ffn_kept[index]] = coefficients["ffn"][index][ticket.ffn_kept[index]]
                hf_layer.output.dense.weight.mul_(neuron_scale)
            input_ids, token_type_ids, attention_mask = inputs
            expected = hf_model(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
            actual = prune(model, ticket)(*inputs)
        torch.testing.assert_close(actual.prediction_logits, expected.prediction_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(actual.seq_relationship_logits, expected.seq_relationship_logits,
                                   atol=1e-5, rtol=0)


class ToyClassifier(BertPreTrainedModel):
    """Shaped like a fine-tuning model: ``.bert``, ``.config`` and its own head."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.classifier = nn.Linear(config.hidden_size, 3)
        self.init_weights()

    def forward(self, input_ids, token_type_ids=None, attention_mask=None):
        return self.classifier(self.bert(input_ids, token_type_ids, attention_mask)[1])


@pytest.mark.parametrize("cls", [BertModel, ToyClassifier])
def test_prune_keeps_the_model_class(cls):
    config = make_config("uniform-4x32")
    model = make_model(config, cls=cls)
    ticket = draw_ticket(model, heads_to_prune=2, ffn_ratio=0.5)
    pruned = prune(model, ticket)
    assert type(pruned) is cls and pruned.config is pruned.bert_model().config
    inputs = sample_batch(config)
    with torch.no_grad():
        expected, actual = zero_dropped_coefficients(model, ticket)(*inputs), pruned(*inputs)
    expected, actual = (expected[0], actual[0]) if cls is BertModel else (expected, actual)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_prune_works_on_plain_weights_and_round_trips_through_save_pretrained(tmp_path):
    """Pre-trained weights without coefficients (fine-tuning) prune too; the folder records the geometry."""
    config = make_config("uniform-4x32")
    torch.manual_seed(5)
    model = BertForPreTraining(config).eval()
    ticket = random_ticket(config, heads_to_prune=2, ffn_ratio=0.3, seed=1)
    pruned = prune(model, ticket)
    assert not model.config.slimming and list(model.slimming_coefficients()) == []
    save_pretrained(pruned, tmp_path / "pruned")
    reloaded = load_pretrained(BertForPreTraining, tmp_path / "pruned").eval()
    assert reloaded.config.heads_per_layer == pruned.config.heads_per_layer
    assert reloaded.config.ffn_per_layer == pruned.config.ffn_per_layer
    inputs = sample_batch(config)
    with_ones = copy.deepcopy(model)
    with_ones.add_slimming_coefficients()
    with torch.no_grad():
        expected = zero_dropped_coefficients(with_ones, ticket)(*inputs).prediction_logits
        assert torch.equal(reloaded(*inputs).prediction_logits, pruned(*inputs).prediction_logits)
    torch.testing.assert_close(pruned(*inputs).prediction_logits.detach(), expected, atol=1e-5, rtol=0)
    # parameter_counts (used by the report) agrees with the tensors the pruned model really holds.
    assert ticket_report(ticket, config)["parameters"]["total"]["pruned"] == pruned.num_parameters()
    assert ticket_report(ticket, config)["parameters"]["total"]["dense"] == model.num_parameters()


def test_pruned_model_trains():
    config = make_config("uniform-3x24")
    model = make_model(config)
    pruned = prune(model, draw_ticket(model, heads_to_prune=1, ffn_ratio=0.5)).train()
    input_ids, token_type_ids, attention_mask = sample_batch(config)
    labels = torch.full_like(input_ids, -100)
    labels[:, 3] = input_ids[:, 3]
    output = pruned(input_ids, token_type_ids, attention_mask, labels=labels,
                    next_sentence_label=torch.tensor([0, 1, 0]))
    output.loss.backward()
    grads = [p.grad for p in pruned.encoder_layers()[0].parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_prune_refuses_a_ticket_for_another_geometry():
    ticket = draw_ticket(make_model(make_config("uniform-4x32")), heads_to_prune=1)
    with pytest.raises(TicketError, match="num_attention_heads=4, but the model has num_attention_heads=8"):
        prune(make_model(make_config("uniform-4x32", num_attention_heads=8)), ticket)
    with pytest.raises(TicketError, match="num_hidden_layers=3, but the model has num_hidden_layers=2"):
        prune(make_model(make_config("uniform-3x24")), ticket)
    with pytest.raises(TicketError, match="ffn_per_layer"):
        prune(make_model(make_config("uniform-4x32", intermediate_size=60)), ticket)


# --- drawing: exact counts, order, adversarial coefficients -----------------------------------------------------


def test_heads_pruned_layerwise_exactly_by_smallest_magnitude():
    config = make_config("uniform-4x32", num_hidden_layers=4, num_attention_heads=8)
    coefficients = gather_coefficients(make_model(config, seed=7))
    coefficients["head"][2] = -coefficients["head"][2]  # magnitude, not sign, decides
    for heads_to_prune, per_layer in ((3, 3), (3.0, 3), (0.25, 2), (0, 0)):
        ticket = draw_ticket(coefficients, heads_to_prune=heads_to_prune, config=config)
        for layer, kept in enumerate(ticket.heads_kept):
            assert len(kept) == 8 - per_layer
            expected = sorted(np.argsort(np.abs(coefficients["head"][layer].numpy()))[per_layer:].tolist())
            assert kept == expected


def test_global_ffn_ratio_is_exact_and_matches_a_plain_sort():
    config = make_config("uniform-4x32", num_hidden_layers=4)
    coefficients = gather_coefficients(make_model(config, seed=11))
    total = sum(config.ffn_per_layer)
    for ratio in (0.1, 0.3, 0.4, 0.29):
        ticket = draw_ticket(coefficients, heads_to_prune=1, ffn_ratio=ratio, config=config)
        pruned = total - sum(len(kept) for kept in ticket.ffn_kept)
        assert pruned == math.floor(ratio * total + 1e-9) and abs(pruned - ratio * total) < 1
        flat = torch.cat(coefficients["ffn"]).abs().numpy()
        expected_pruned = set(np.argsort(flat, kind="stable")[:pruned].tolist())
        actual_pruned = {layer * 64 + i for layer in range(4) for i in range(64) if i not in ticket.ffn_kept[layer]}
        assert actual_pruned == expected_pruned
    # Later layers have smaller coefficients here, so global pruning takes more from them (the paper's finding).
    widths = [len(kept) for kept in draw_ticket(coefficients, 1, 0.3, config=config).ffn_kept]
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]


def test_layerwise_ffn_prunes_the_ratio_in_every_layer():
    config = make_config("uneven-source")
    ticket = draw_ticket(make_model(config), heads_to_prune=2, ffn_ratio=0.3, ffn_scope="layerwise")
    assert [len(kept) for kept in ticket.ffn_kept] == [48 - 14, 30 - 9]
    assert [len(kept) for kept in ticket.heads_kept] == [4, 2]


def test_ties_are_broken_deterministically():
    """All coefficients tied: the seeded permutation decides, the same way every time (no layer favoured:
    tests/test_precision.py)."""
    config = make_config("uniform-3x24")
    coefficients = {"head": [torch.ones(3), torch.ones(3)], "ffn": [torch.ones(40), torch.ones(40)]}
    ticket = draw_ticket(coefficients, heads_to_prune=1, ffn_ratio=0.5, config=config)
    assert [len(kept) for kept in ticket.heads_kept] == [2, 2]
    assert sum(len(kept) for kept in ticket.ffn_kept) == 40 and all(len(kept) > 1 for kept in ticket.ffn_kept)
    assert ticket.digest() == draw_ticket(coefficients, 1, 0.5, config=config).digest()


def test_ffn_widths_rounded_to_a_multiple():
    config = BertConfig(**{**SMALL, "hidden_size": 32, "num_hidden_layers": 6, "num_attention_heads": 4,
                           "intermediate_size": 100})
    generator = torch.Generator().manual_seed(2)
    coefficients = {"head": [torch.rand(4, generator=generator) for _ in range(6)],
                    "ffn": [torch.rand(100, generator=generator) * (1 - 0.1 * layer) for layer in range(6)]}
    exact = draw_ticket(coefficients, 1, 0.3, config=config)
    rounded = draw_ticket(coefficients, 1, 0.3, config=config, ffn_multiple_of=8)
    widths = [len(kept) for kept in rounded.ffn_kept]
    assert all(width % 8 == 0 for width in widths) and widths != [len(kept) for kept in exact.ffn_kept]
    assert abs(sum(widths) - sum(map(len, exact.ffn_kept))) <= 4  # largest remainders: within half a multiple
    assert rounded.ffn_multiple_of == 8 and rounded.heads_kept == exact.heads_kept
    for layer, kept in enumerate(rounded.ffn_kept):  # each layer keeps its largest |c|
        magnitudes = coefficients["ffn"][layer]
        dropped = [i for i in range(100) if i not in kept]
        assert magnitudes[kept].min() > magnitudes[dropped].max()
    layerwise = draw_ticket(coefficients, 1, 0.3, "layerwise", config=config, ffn_multiple_of=8)
    # 70 kept per layer (420): all round down to 64 (384), then the 36 missing = 4.5 multiples -> 4 layers round
    # up, lower layers first on equal remainders: 416 total, the closest multiple-of-8 widths can get.
    assert [len(kept) for kept in layerwise.ffn_kept] == [72, 72, 72, 72, 64, 64]
    with pytest.raises(ValueError, match="ffn_multiple_of must be a positive integer"):
        draw_ticket(coefficients, 1, 0.3, config=config, ffn_multiple_of=0)


def test_adversarial_coefficients_never_empty_a_layer():
    config = make_config("uniform-4x32")
    coefficients = gather_coefficients(make_model(config))
    coefficients["ffn"][1] = torch.zeros(64)  # a whole layer the plain global pick would remove
    coefficients["head"][1] = torch.zeros(4)
    ticket = draw_ticket(coefficients, heads_to_prune=3, ffn_ratio=0.5, config=config)
    assert len(ticket.ffn_kept[1]) == 1  # one unit (all tied: the seeded permutation picks which) survives
    assert ticket.ffn_layers_kept_best_unit == [1]
    assert sum(len(kept) for kept in ticket.ffn_kept) == 3 * 64 - 96  # the total stays exact
    assert [len(kept) for kept in ticket.heads_kept] == [1, 1, 1]
    # Every layer all-zero and a ratio that leaves fewer neurons than layers: one neuron per layer survives.
    zeros = {"head": [torch.zeros(4)] * 3, "ffn": [torch.zeros(64)] * 3}
    ticket = draw_ticket(zeros, heads_to_prune=3, ffn_ratio=0.999, config=config)
    assert [len(kept) for kept in ticket.ffn_kept] == [1, 1, 1]


# --- random baseline --------------------------------------------------------------------------------------------


def test_random_ticket_has_the_drawn_counts():
    config = make_config("uniform-4x32", num_hidden_layers=4)
    drawn = draw_ticket(make_model(config), heads_to_prune=1, ffn_ratio=0.3)
    rand = random_ticket(config, heads_to_prune=1, ffn_ratio=0.3, seed=3)
    assert [len(k) for k in rand.heads_kept] == [len(k) for k in drawn.heads_kept]
    assert sum(map(len, rand.ffn_kept)) == sum(map(len, drawn.ffn_kept))
    assert rand.method == "random" and rand.seed == 3
    assert rand.digest() == random_ticket(config, 1, 0.3, seed=3).digest()
    assert rand.digest() != random_ticket(config, 1, 0.3, seed=4).digest()
    layerwise = random_ticket(config, 1, 0.3, "layerwise", seed=3)
    assert [len(k) for k in layerwise.ffn_kept] == [64 - 19] * 4
    matched = random_ticket(config, seed=5, like=drawn)
    assert [len(k) for k in matched.ffn_kept] == [len(k) for k in drawn.ffn_kept]
    assert [len(k) for k in matched.heads_kept] == [len(k) for k in drawn.heads_kept]
    assert mask_distance(matched, drawn)["ffn"] > 0


# --- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, float("nan")])
def test_ffn_ratio_outside_unit_interval_is_refused(ratio):
    with pytest.raises(ValueError, match=r"ffn_ratio must be a fraction in \[0, 1\)"):
        draw_ticket(make_model(make_config("uniform-3x24")), heads_to_prune=1, ffn_ratio=ratio)


@pytest.mark.parametrize("heads_to_prune, message", [(3, "prune 3 of the 3 heads in layer 0"), (2.5, "whole number"),
                                                     (-1, "whole number")])
def test_impossible_heads_to_prune_is_refused(heads_to_prune, message):
    with pytest.raises(ValueError, match=message):
        draw_ticket(make_model(make_config("uniform-3x24")), heads_to_prune=heads_to_prune)


def test_bad_coefficients_are_refused():
    config = make_config("uniform-3x24")
    coefficients = gather_coefficients(make_model(config))
    coefficients["ffn"][1][5] = float("nan")
    with pytest.raises(ValueError, match=r"coefficients\['ffn'\]\[1\] contains NaN"):
        draw_ticket(coefficients, config=config)
    with pytest.raises(ValueError, match=r"coefficients\['head'\] must hold one tensor per layer"):
        draw_ticket({"ffn": coefficients["ffn"]}, config=config)
    with pytest.raises(ValueError, match="needs config="):
        draw_ticket(gather_coefficients(make_model(config)))
    plain = BertForPreTraining(make_config("uniform-3x24"))
    for call in (lambda: draw_ticket(plain, 1), lambda: l1_penalty(plain), lambda: gather_coefficients(plain)):
        with pytest.raises(ValueError, match=r"call model.add_slimming_coefficients\(\) or set config.slimming"):
            call()


# --- persistence ------------------------------------------------------------------------------------------------


def test_json_round_trip_keeps_the_digest(tmp_path):
    model = make_model(make_config("uneven-source"))
    ticket = draw_ticket(model, heads_to_prune=2, ffn_ratio=0.3, step=120, lam_heads=1e-4)
    ticket.save(tmp_path / "t.json")
    loaded = Ticket.load(tmp_path / "t.json")
    assert loaded == ticket and loaded.digest() == ticket.digest()
    assert json.loads((tmp_path / "t.json").read_text())["digest"] == ticket.digest()
    assert loaded.step == 120 and loaded.lam_heads == 1e-4 and loaded.source_geometry["vocab_size"] == 50
    other = draw_ticket(model, heads_to_prune=1, ffn_ratio=0.3)
    assert other.digest() != ticket.digest()


def test_corrupt_or_foreign_ticket_files_are_refused(tmp_path):
    ticket = draw_ticket(make_model(make_config("uniform-3x24")), heads_to_prune=1)
    values = ticket.to_dict()

    def write(name, content):
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return path

    cases = [
        (tmp_path / "missing.json", "ticket file not found"),
        (write("truncated.json", json.dumps(values)[:50]), "not valid JSON"),
        (write("config.json", {"hidden_size": 24, "model_type": "bert"}), "not an EarlyBERT ticket"),
        (write("list.json", [1, 2]), "not an EarlyBERT ticket"),
        (write("v9.json", {**values, "schema_version": 9}), "schema_version 9"),
        (write("unsorted.json", {**values, "heads_kept": [[2, 1], [0, 1]]}), r"heads_kept\[0\] is not sorted"),
        (write("range.json", {**values, "ffn_kept": [[0, 40], [1]]}), r"ffn_kept\[0\] has an index outside 0..39"),
        (write("empty.json", {**values, "heads_kept": [[], [0]]}), r"heads_kept\[0\] is empty"),
        (write("layers.json", {**values, "heads_kept": [[0]]}), "heads_kept has 1 layers"),
        (write("strings.json", {**values, "heads_kept": [["a"], [0]]}), r"heads_kept\[0\]\[0\]: expected an integer"),
        (write("edited.json", {**values, "heads_kept": [[0, 2], [0, 1]]}), "digest mismatch"),
        (write("extra.json", {**values, "heads": 3}), "unknown ticket fields heads"),
    ]
    for path, message in cases:
        with pytest.raises(TicketError, match=message) as caught:
            Ticket.load(path)
        assert str(path) in str(caught.value)


def test_check_fits_and_pruned_config():
    config = make_config("uniform-4x32")
    ticket = draw_ticket(make_model(config), heads_to_prune=1, ffn_ratio=0.3)
    ticket.check_fits(config)
    with pytest.raises(TicketError, match="hidden_size=32, but the model has hidden_size=64"):
        ticket.check_fits(make_config("uniform-4x32", hidden_size=64))
    with pytest.raises(TicketError, match="num_hidden_layers=3, but the model has num_hidden_layers=2"):
        ticket.check_fits(make_config("uniform-4x32", num_hidden_layers=2))
    pruned = ticket.pruned_config(config)
    assert pruned is not config and pruned.heads_per_layer == [3, 3, 3] and not pruned.slimming
    assert sum(pruned.ffn_per_layer) == 3 * 64 - math.floor(0.3 * 192)
    assert config.heads_per_layer == [4, 4, 4]


# --- mask distance, early-bird detection, history ---------------------------------------------------------------


def test_mask_distance_properties():
    config = make_config("uniform-4x32")
    geometry = geometry_of(config)
    a = Ticket(heads_kept=[[0, 1]] * 3, ffn_kept=[list(range(32))] * 3, source_geometry=geometry)
    complement = Ticket(heads_kept=[[2, 3]] * 3, ffn_kept=[list(range(32, 64))] * 3, source_geometry=geometry)
    assert mask_distance(a, a) == {"head": 0.0, "ffn": 0.0, "combined": 0.0}
    assert mask_distance(a, complement) == {"head": 1.0, "ffn": 1.0, "combined": 1.0}
    # One head differs in one layer (2 of 12 mask bits), 4 neurons differ in another (8 of 192 bits).
    b = Ticket(heads_kept=[[0, 2], [0, 1], [0, 1]], ffn_kept=[list(range(32)), list(range(4, 36)), list(range(32))],
               source_geometry=geometry)
    assert mask_distance(a, b) == pytest.approx({"head": 2 / 12, "ffn": 8 / 192, "combined": (2 / 12 + 8 / 192) / 2})
    x, y = random_ticket(config, 1, 0.4, seed=1), random_ticket(config, 2, 0.2, seed=2)
    assert mask_distance(x, y) == mask_distance(y, x)
    with pytest.raises(ValueError, match="different geometries"):
        mask_distance(x, random_ticket(make_config("uniform-4x32", intermediate_size=60), 1, seed=1))


def test_early_bird_detector_fires_on_converging_masks_only():
    config = make_config("uniform-4x32", num_hidden_layers=4, num_attention_heads=8)
    settled = random_ticket(config, 2, 0.3, seed=0)
    converging = [random_ticket(config, 2, 0.3, seed=s) for s in range(1, 4)] + [settled] * 6
    detector = EarlyBirdDetector(window=5, eps=0.1)
    fired = [detector.update(ticket) for ticket in converging]
    # The window holds 5 masks from update 3 on; it is all `settled` (distance 0) from update 7.
    assert fired == [False] * 7 + [True] * 2
    assert detector.fired and detector.fired_at_update == 7 and len(detector.distances) == len(converging) - 1
    assert detector.distances[-1] == {"head": 0.0, "ffn": 0.0}

    other = random_ticket(config, 2, 0.3, seed=9)
    assert min(mask_distance(settled, other)["head"], mask_distance(settled, other)["ffn"]) > 0.1
    oscillating = EarlyBirdDetector(window=5, eps=0.1)
    assert not any(oscillating.update(settled if i % 2 else other) for i in range(12))
    assert not oscillating.fired
    # Heads converged but FFN not: both are required.
    ffn_moving = [Ticket(heads_kept=settled.heads_kept, ffn_kept=random_ticket(config, 2, 0.3, seed=s).ffn_kept,
                         source_geometry=settled.source_geometry) for s in range(10)]
    assert not any(EarlyBirdDetector().update(ticket) for ticket in ffn_moving)
    with pytest.raises(ValueError, match="window must be an integer >= 2"):
        EarlyBirdDetector(window=1)


def test_mask_history_matrix_heatmap_and_round_trip(tmp_path):
    from matplotlib.image import imread

    config = make_config("uniform-4x32")
    tickets = [random_ticket(config, 1, 0.3, seed=s) for s in range(4)]
    history = MaskHistory()
    for step, ticket in zip((10, 20, 30, 40), tickets):
        history.add(step, ticket)
    for kind in ("head", "ffn", "combined"):
        matrix = history.distance_matrix(kind)
        assert matrix.shape == (4, 4) and np.allclose(matrix, matrix.T) and not matrix.diagonal().any()
        assert matrix[1, 3] == mask_distance(tickets[1], tickets[3])[kind]
    history.save_heatmap(tmp_path / "heatmap.png")
    data = (tmp_path / "heatmap.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(tmp_path / "heatmap.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 200 and image.std() > 0
    array = history.heatmap_image(kinds=("combined",))
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
    history.save(tmp_path / "history.json")
    loaded = MaskHistory.load(tmp_path / "history.json")
    assert loaded.steps == [10, 20, 30, 40] and [t.digest() for t in loaded.tickets] == [t.digest() for t in tickets]
    loaded.add(30, tickets[0])  # a resumed search re-records step 30: later entries go
    assert loaded.steps == [10, 20, 30] and loaded.tickets[-1].digest() == tickets[0].digest()
    with pytest.raises(ValueError, match="MaskHistory is empty"):
        MaskHistory().save_heatmap(tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a mask history"):
        MaskHistory.load(tmp_path / "bad.json")


# --- search stage: L1 penalty and a short search ----------------------------------------------------------------


def test_l1_penalty_and_gathered_coefficients():
    model = make_model(make_config("uniform-3x24"))
    heads = sum(c.abs().sum() for kind, _, c in model.slimming_coefficients() if kind == "head")
    ffn = sum(c.abs().sum() for kind, _, c in model.slimming_coefficients() if kind == "ffn")
    torch.testing.assert_close(l1_penalty(model, 1e-3), 1e-3 * (heads + ffn))
    torch.testing.assert_close(l1_penalty(model, 1e-3, lam_ffn=2e-2), 1e-3 * heads + 2e-2 * ffn)
    gathered = gather_coefficients(model)
    assert [len(t) for t in gathered["head"]] == [3, 3] and [len(t) for t in gathered["ffn"]] == [40, 40]
    assert all(t.dtype == torch.float32 and not t.requires_grad for t in gathered["ffn"])
    gathered["ffn"][0].zero_()
    assert model.encoder_layers()[0].intermediate.neuron_coefficients.abs().sum() > 0  # a copy, not a view


def test_short_search_moves_coefficients_and_draws_a_non_random_ticket():
    """50 AdamW steps of MLM + NSP + a large L1 penalty on a tiny BERT (the search stage, without DeepSpeed)."""
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, slimming=True,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertForPreTraining(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    # A learnable task: the label at a masked position is the token before it, so heads matter.
    for _ in range(50):
        input_ids = torch.randint(1, 64, (8, 16), generator=generator)
        labels = torch.full_like(input_ids, -100)
        labels[:, 5:12:3] = input_ids[:, 4:11:3]
        loss = model(input_ids, labels=labels, next_sentence_label=torch.zeros(8, dtype=torch.long)).loss
        loss = loss + l1_penalty(model, lam_heads=1e-3)  # 10x the paper's lambda (Sec. 4.3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    coefficients = gather_coefficients(model)
    for kind in ("head", "ffn"):
        values = torch.cat(coefficients[kind])
        assert values.abs().mean() < 0.9 and values.std() > 0.01  # pushed down by L1, spread apart by the task
    drawn = draw_ticket(model, heads_to_prune=2, ffn_ratio=0.3, step=50, lam_heads=1e-3)
    rand = random_ticket(config, seed=0, like=drawn)
    assert [len(k) for k in rand.ffn_kept] == [len(k) for k in drawn.ffn_kept]
    assert mask_distance(drawn, rand)["ffn"] > 0.1 and drawn.digest() != rand.digest()
    # The drawn ticket keeps exactly the largest |c|: every kept coefficient beats every pruned one in its layer.
    for layer, kept in enumerate(drawn.heads_kept):
        magnitudes = coefficients["head"][layer].abs()
        dropped = [h for h in range(4) if h not in kept]
        assert magnitudes[kept].min() >= magnitudes[dropped].max()
    flat = torch.cat(coefficients["ffn"]).abs()
    kept_mask = torch.from_numpy(drawn.masks()[1])
    assert flat[kept_mask].min() >= flat[~kept_mask].max()


def test_report_counts_and_text():
    config = BertConfig()  # BERT-base, the paper's pre-training ticket: 4 heads / 30% FFN
    coefficients = {"head": [torch.rand(12) for _ in range(12)],
                    "ffn": [torch.rand(3072) * (1 - 0.05 * layer) for layer in range(12)]}
    ticket = draw_ticket(coefficients, heads_to_prune=4, ffn_ratio=0.3, config=config)
    report = ticket_report(ticket)
    assert [row["heads_kept"] for row in report["layers"]] == [8] * 12
    assert sum(row["ffn_kept"] for row in report["layers"]) == 36864 - math.floor(0.3 * 36864)
    ratio_128 = report["flops_per_token"][128]["ratio"]
    assert 0.6 < ratio_128 < 0.8 and report["flops_per_token"][128]["predicted_step_time_ratio"] == ratio_128
    assert report["parameters"]["attention"]["ratio"] == pytest.approx(8 / 12, rel=1e-3)
    text = render_report(report)
    assert f"{ratio_128:.3f}" in text and "8 / 12" in text
