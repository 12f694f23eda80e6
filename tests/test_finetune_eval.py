"""Fine-tuning evaluation as the training runs it: under the training precision, each rank scoring its share, and
SQuAD's loss blind to padding whatever the kernel path."""

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from finetune_fixtures import make_tiny_model

from earlybert_pretrain.finetune import loop
from earlybert_pretrain.finetune.models import BertForQuestionAnswering, BertForSequenceClassification
from earlybert_pretrain.finetune.tasks import get_task


def _features(count: int, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    rows = [rng.integers(5, 50, size=int(rng.integers(3, 12))).tolist() for _ in range(count)]
    return datasets.Dataset.from_dict({"input_ids": rows, "token_type_ids": [[0] * len(row) for row in rows],
                                       "label": [index % 2 for index in range(count)]})


class CountingModel(torch.nn.Module):
    """The classifier, counting the rows it is asked to score."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, **inputs):
        self.rows += inputs["input_ids"].shape[0]
        return self.model(**inputs)


def test_each_rank_scores_its_share_and_every_rank_gets_all_logits(tmp_path, monkeypatch):
    classifier = BertForSequenceClassification.from_pretrained(make_tiny_model(tmp_path / "m"), num_labels=2)
    features, task = _features(13), get_task("sst2")
    expected = loop.predict(classifier, features, task, torch.device("cpu"), 4, 0)
    shares = {}
    for rank in (0, 1):
        counting = CountingModel(classifier)
        monkeypatch.setattr(loop.distributed, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(loop.distributed, "world_size", lambda: 2)
        monkeypatch.setattr(loop.distributed, "from_every_rank", lambda value, rank=rank: shares.update({rank: value})
                            or [shares.get(0, []), shares.get(1, [])])
        gathered = loop.predict(counting, features, task, torch.device("cpu"), 4, 0)
        assert counting.rows == (7 if rank == 0 else 6)  # 13 features: a contiguous share of ceil(13/2) each
    assert len(gathered) == len(expected) == 13
    for got, want in zip(gathered, expected):  # batches padded to other lengths: equal up to float rounding
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_evaluation_runs_under_the_training_precision(tmp_path, precision):
    classifier = BertForSequenceClassification.from_pretrained(make_tiny_model(tmp_path / "m"), num_labels=2).eval()
    features, task = _features(6), get_task("sst2")
    got = np.stack(loop.predict(classifier, features, task, torch.device("cpu"), 8, 0, precision))
    batch = loop.model_inputs(loop.pad_batch([features[i] for i in range(6)], 0), task, torch.device("cpu"),
                              with_targets=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        reference = classifier(**batch).logits.float().numpy()
    np.testing.assert_array_equal(got, reference)
    with torch.no_grad():
        full = classifier(**batch).logits.numpy()
    assert (np.abs(got - full).max() > 1e-5) == (precision == "bf16")  # bf16 really rounds; fp32 is exact


def test_squad_loss_leaves_padding_out_on_the_padded_and_unpadded_paths(tmp_path):
    folder = make_tiny_model(tmp_path / "m")
    input_ids = torch.randint(5, 50, (3, 12), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 6:] = 0
    attention_mask[2, 9:] = 0
    starts, ends = torch.tensor([1, 3, 8]), torch.tensor([4, 3, 8])
    losses = {}
    for unpad in (False, True):
        torch.manual_seed(0)  # the same fresh qa_outputs head for both paths
        model = BertForQuestionAnswering.from_pretrained(folder, unpad=unpad).eval()
        with torch.no_grad():
            output = model(input_ids, torch.zeros_like(input_ids), attention_mask, starts, ends)
        # Reference: the softmax over each row's real tokens alone.
        reference = 0.0
        for row in range(3):
            length = int(attention_mask[row].sum())
            for column, target in ((0, starts[row]), (1, ends[row])):
                reference += F.cross_entropy(output.logits[row, :length, column].double()[None], target[None]) / 6
        torch.testing.assert_close(output.loss.double(), reference, atol=1e-6, rtol=1e-6)
        losses[unpad] = output.loss
    torch.testing.assert_close(losses[True], losses[False], atol=1e-5, rtol=1e-5)
