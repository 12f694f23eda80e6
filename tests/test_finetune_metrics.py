"""Fine-tuning metrics against independent implementations (scikit-learn, scipy, hand-checked SQuAD strings)."""

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score
from sklearn.metrics import matthews_corrcoef as sk_mcc

from earlybert_pretrain.finetune import metrics
from earlybert_pretrain.finetune.tasks import TASKS, UnknownTaskError, get_task


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    predictions = np.where(rng.random(200) < 0.7, labels, 1 - labels)
    assert metrics.binary_f1(predictions, labels) == pytest.approx(f1_score(labels, predictions))
    assert metrics.matthews_corrcoef(predictions, labels) == pytest.approx(sk_mcc(labels, predictions))
    assert metrics.accuracy(predictions, labels) == pytest.approx(np.mean(predictions == labels))
    three_class_labels, three_class_predictions = rng.integers(0, 3, 150), rng.integers(0, 3, 150)
    assert metrics.matthews_corrcoef(three_class_predictions, three_class_labels) == pytest.approx(
        sk_mcc(three_class_labels, three_class_predictions))


def test_degenerate_metrics_are_zero_like_sklearn():
    labels, constant = np.array([0, 1, 0, 1]), np.zeros(4, dtype=int)
    assert metrics.matthews_corrcoef(constant, labels) == sk_mcc(labels, constant) == 0.0
    assert metrics.binary_f1(constant, labels) == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_correlations_match_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 6, 100).astype(float)  # STS-B-like scores with many ties
    predictions = labels + rng.normal(0, 1.5, 100)
    predictions[:10] = predictions[0]  # ties among predictions too
    assert metrics.pearson(predictions, labels) == pytest.approx(pearsonr(predictions, labels)[0])
    assert metrics.spearman(predictions, labels) == pytest.approx(spearmanr(predictions, labels)[0])


def test_squad_normalisation_and_scores_hand_checked():
    # Official v1.1: lower case, punctuation removed, articles a/an/the removed, whitespace collapsed.
    assert metrics.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert metrics.normalize_answer("an apple, a pear") == "apple pear"
    assert metrics.normalize_answer("theatre") == "theatre"  # 'the' only as a word
    assert metrics.squad_exact_match("the Eiffel tower.", "Eiffel Tower") == 1.0
    # prediction "in paris france" vs truth "paris": overlap 1, precision 1/3, recall 1 -> F1 = 0.5
    assert metrics.squad_f1("in Paris, France", "Paris") == pytest.approx(0.5)
    assert metrics.squad_f1("blue", "red") == 0.0
    scores = metrics.squad_scores({"q1": "Paris", "q2": "in 1889", "q3": "wrong"},
                                  {"q1": ["paris", "Paris, France"], "q2": ["1889"], "q3": ["right"], "q4": ["x"]})
    # q1 EM 1, F1 1; q2 EM 0, F1 2*(1/2*1)/(1.5) = 2/3; q3 0; q4 unanswered 0.
    assert scores["exact_match"] == pytest.approx(25.0)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 4)


def test_task_scores_are_percent_and_named():
    scores = metrics.classification_scores(("f1", "accuracy"), [1, 0, 1, 1], [1, 0, 0, 1])
    assert scores == {"f1": pytest.approx(80.0), "accuracy": pytest.approx(75.0)}


def test_task_registry():
    assert set(TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "squad"}
    assert get_task("SST-2").name == "sst2" and get_task("STS-B").kind == "regression"
    assert get_task("mnli").num_labels == 3 and get_task("stsb").num_labels == 1
    assert get_task("cola").primary_metric == "mcc" and get_task("squad").primary_metric == "f1"
    with pytest.raises(UnknownTaskError, match="known tasks: cola, sst2"):
        get_task("imdb")
