"""Unpadded BERT (model/unpad.py) against the padded model and transformers, and the attention kernel report."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_modeling import hf_model, ours_from, padded_batch
from test_ticket import make_config, make_model, uneven_tickets

from earlybert_pretrain.common.tokens import IGNORE_INDEX
from earlybert_pretrain.config import OptimizerConfig, PretrainConfig, build_dataclass
from earlybert_pretrain.errors import ConfigError
from earlybert_pretrain.model import bert as bert_module
from earlybert_pretrain.model.bert import BertConfig, BertForPreTraining
from earlybert_pretrain.model.unpad import Packing, varlen_attention, varlen_backend, worth_unpadding
from earlybert_pretrain.tickets.prune import prune
from earlybert_pretrain.train.stage import Runtime, Schedule, Stage, StageSettings

TOLERANCE = 1e-5


def mlm_batch(vocab: int, batch: int = 4, seq: int = 16, seed: int = 2) -> dict[str, torch.Tensor]:
    """Right-padded rows of lengths seq, seq-5, 7, 3 with a few masked positions and NSP labels."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=generator)
    types = (torch.arange(seq) >= seq // 2).long().expand(batch, seq).clone()
    mask = torch.zeros(batch, seq, dtype=torch.long)
    labels = torch.full((batch, seq), IGNORE_INDEX)
    for row, length in enumerate([seq, seq - 5, 7, 3][:batch]):
        mask[row, :length] = 1
        labels[row, 1:length:3] = ids[row, 1:length:3]
    ids = ids * mask
    return {"input_ids": ids, "token_type_ids": types * mask, "attention_mask": mask, "labels": labels,
            "next_sentence_label": torch.arange(batch) % 2}


def with_unpad(model: BertForPreTraining, unpad: bool) -> BertForPreTraining:
    twin = copy.deepcopy(model)
    twin.config.unpad = unpad
    return twin


def run(model: BertForPreTraining, batch: dict) -> tuple[torch.Tensor, ...]:
    """Loss, MLM logits at the masked positions, NSP logits and every parameter's gradient."""
    model.zero_grad()
    output = model(**batch)
    output.loss.backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return (output.loss, output.prediction_logits, output.seq_relationship_logits, *grads)


def assert_close(padded: tuple, unpadded: tuple) -> None:
    assert len(padded) == len(unpadded)
    for a, b in zip(padded, unpadded):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= TOLERANCE


def assert_unpadded_matches(model: BertForPreTraining, batch: dict) -> None:
    model = model.train()  # the training path; the configs here have dropout 0, so it is deterministic
    padded, unpadded = with_unpad(model, False), with_unpad(model, True)
    assert_close(run(padded, batch), run(unpadded, batch))
    assert padded.attention_kernels() == ["padded:cpu-flash"]
    assert unpadded.attention_kernels() == ["unpadded:per-sequence:cpu-flash"]


def no_dropout(**overrides) -> BertConfig:
    return make_config("uniform-4x32", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **overrides)


# --- the packing and variable-length attention ------------------------------------------------------------------


def test_packing_gathers_and_scatters_the_real_tokens():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    packing = Packing.from_mask(mask, mask.sum(1).tolist())
    values = torch.arange(8.0).view(2, 4)
    assert packing.gather(values).tolist() == [0.0, 1.0, 2.0, 4.0, 5.0]
    assert packing.positions.tolist() == [0, 1, 2, 0, 1]
    assert packing.offsets.tolist() == [0, 3, 5]
    assert packing.scatter(packing.gather(values)).tolist() == [[0.0, 1.0, 2.0, 0.0], [4.0, 5.0, 0.0, 0.0]]
    assert packing.first_tokens(packing.gather(values)).tolist() == [0.0, 4.0]


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # CPU nested SDPA's own fallback
@pytest.mark.parametrize("nested", [False, True], ids=["per-sequence", "nested"])
def test_varlen_attention_equals_masked_attention(nested):
    batch, seq, heads, size = 3, 10, 2, 8
    mask = torch.arange(seq)[None] < torch.tensor([[10], [6], [1]])
    packing = Packing.from_mask(mask, mask.sum(1).tolist())
    torch.manual_seed(0)
    padded = [torch.randn(batch, seq, heads, size, requires_grad=True) for _ in range(3)]
    expected = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in padded), attn_mask=mask[:, None, None])
    expected = packing.gather(expected.transpose(1, 2))
    expected_grads = torch.autograd.grad(expected.square().sum(), padded)
    packed = [packing.gather(x.detach()).requires_grad_() for x in padded]
    got = varlen_attention(*packed, packing, dropout_p=0.0, nested=nested)
    grads = torch.autograd.grad(got.square().sum(), packed)
    assert_close((expected, *(packing.gather(g) for g in expected_grads)), (got, *grads))


# --- the unpadded model equals the padded one -------------------------------------------------------------------


def test_unpadded_equals_padded_with_slimming_coefficients():
    config = no_dropout()
    model = make_model(config)  # random, layer-dependent coefficients
    assert config.slimming
    assert_unpadded_matches(model, mlm_batch(config.vocab_size))


def test_unpadded_equals_padded_on_an_uneven_pruned_ticket():
    config = make_config("uneven-source", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = make_model(config)
    for ticket in uneven_tickets(config, model):
        pruned = prune(model, ticket)
        assert len(set(pruned.config.heads_per_layer)) > 1 or len(set(pruned.config.ffn_per_layer)) > 1
        assert_unpadded_matches(pruned, mlm_batch(config.vocab_size, seed=3))


def test_unpadded_logits_without_labels_match_at_real_tokens_and_are_zero_at_padding():
    config = no_dropout()
    model = make_model(config)
    batch = {key: value for key, value in mlm_batch(config.vocab_size).items()
             if key not in ("labels", "next_sentence_label")}
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        padded = with_unpad(model, False)(**batch).prediction_logits
        unpadded = with_unpad(model, True)(**batch).prediction_logits
        sequence, pooled = with_unpad(model, True).bert(**batch)
        padded_sequence, padded_pooled = with_unpad(model, False).bert(**batch)
    assert (padded[real] - unpadded[real]).abs().max().item() <= TOLERANCE
    assert not unpadded[~real].any() and not sequence[~real].any()
    assert (sequence[real] - padded_sequence[real]).abs().max().item() <= TOLERANCE
    assert (pooled - padded_pooled).abs().max().item() <= TOLERANCE


def test_unpadded_matches_transformers():
    reference = hf_model(48, 3, 6, 70)
    ours = ours_from(reference, unpad=True)
    ids, types, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        expected = reference(input_ids=ids, token_type_ids=types, attention_mask=mask)
        got = ours(ids, types, mask)
    assert (got.prediction_logits[real] - expected.prediction_logits[real]).abs().max().item() <= TOLERANCE
    assert (got.seq_relationship_logits - expected.seq_relationship_logits).abs().max().item() <= TOLERANCE


def test_auto_stays_padded_on_cpu(monkeypatch):
    model = make_model(no_dropout())
    assert model.config.unpad == "auto"
    monkeypatch.setattr(Packing, "from_mask", lambda *args: pytest.fail("auto packed a CPU batch"))
    model(**mlm_batch(model.config.vocab_size))


def test_auto_packs_cuda_batches_with_enough_padding_unless_the_encoder_is_compiled(monkeypatch):
    cuda = torch.device("cuda")
    assert worth_unpadding(cuda, 0.1) and not worth_unpadding(cuda, 0.05)
    assert not worth_unpadding(torch.device("cpu"), 0.9)
    bert = make_model(no_dropout()).bert
    mask = mlm_batch(bert.config.vocab_size)["attention_mask"]
    monkeypatch.setattr(bert_module, "worth_unpadding", lambda device, padding: padding > 0.3)  # as if on CUDA
    assert bert._unpadded(mask, mask.sum(1).tolist())  # 40% padding
    bert.encoder.compile()  # lazy: nothing compiles without a forward
    assert not bert._unpadded(mask, mask.sum(1).tolist())


# --- attention tells the truth ----------------------------------------------------------------------------------


def recorded_masks(monkeypatch) -> list:
    masks, sdpa = [], F.scaled_dot_product_attention

    def recording(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return masks


def test_a_batch_without_padding_calls_sdpa_without_a_mask(monkeypatch):
    model = make_model(no_dropout())
    batch = mlm_batch(model.config.vocab_size)
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    bert = model.bert
    with torch.no_grad():
        masked = bert.encoder(bert.embeddings(batch["input_ids"], batch["token_type_ids"]),
                              batch["attention_mask"].bool()[:, None, None, :])
        masks = recorded_masks(monkeypatch)
        unmasked, _ = bert(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    assert masks == [None] * model.config.num_hidden_layers
    assert (masked - unmasked).abs().max().item() <= TOLERANCE


def test_attention_kernels_name_what_sdpa_dispatched_on_cpu():
    model = make_model(make_config("uniform-4x32")).train()  # dropout 0.1: PyTorch's CPU flash kernel has no dropout
    assert model.attention_kernels() == ["unrecorded"]
    batch = mlm_batch(model.config.vocab_size)
    model(**batch)
    assert model.attention_kernels() == ["padded:math"]
    model.config.unpad = True
    for layer in model.encoder_layers():
        layer.attention.self.dropout_prob = 0.0
    model(**batch)
    assert model.attention_kernels() == ["padded:math", "unpadded:per-sequence:cpu-flash"]
    packing = Packing.from_mask(batch["attention_mask"], batch["attention_mask"].sum(1).tolist())
    packed = torch.randn(packing.indices.numel(), 2, 8)
    assert varlen_backend(packed, packed, packed, packing, 0.0, nested=True) == "nested:math"  # CPU: no varlen kernel


def test_unpad_setting_in_a_config_file():
    assert build_dataclass(PretrainConfig, {"model": {"unpad": True}}).model.unpad is True
    assert build_dataclass(PretrainConfig, {"model": {"unpad": "auto"}}).model.unpad == "auto"
    with pytest.raises(ConfigError, match="unpad"):
        build_dataclass(PretrainConfig, {"model": {"unpad": "yes"}})
    with pytest.raises(ConfigError, match="unpad"):
        BertConfig(unpad="sometimes")


def test_the_run_log_names_the_kernels_of_the_first_step(single_process_dist):
    model = make_model(no_dropout()).train()
    batch = mlm_batch(model.config.vocab_size, batch=2)  # rows of 16 and 11 real tokens
    full = {**batch, "attention_mask": torch.ones_like(batch["attention_mask"])}
    settings = StageSettings(name="kernels", seed=3, global_batch_size=4, micro_batch_size=2,
                             optimizer=OptimizerConfig(), lr=1e-3, schedule=Schedule(total_steps=1, kind=None),
                             grad_clip=1.0)
    with Stage.build(model, settings, Runtime(0, 1, torch.device("cpu"), "fp32")) as stage:
        assert "sdpa_backends" not in stage.description  # nothing has run yet
        stage.run(lambda start: iter([full, batch]), 1)
        assert stage.description["sdpa_backends"] == ["padded:cpu-flash", "unmasked:cpu-flash"]
