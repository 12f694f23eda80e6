"""Scores as the paper reports them (Sec. 4.1): MCC for CoLA, F1 / accuracy, Pearson / Spearman, SQuAD v1.1 EM and F1.

Written from the definitions with numpy only (the tests compare them with scikit-learn and scipy). The SQuAD answer
normalisation and token F1 are those of the official v1.1 evaluation script (evaluate-v1.1.py).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

import numpy as np


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    return float((predictions == labels).mean()) if labels.size else 0.0


def binary_f1(predictions: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """F1 of the positive class (MRPC, QQP); 0 when there is no true positive."""
    predictions, labels = np.asarray(predictions) == positive, np.asarray(labels) == positive
    true_positive = float(np.sum(predictions & labels))
    if true_positive == 0:
        return 0.0
    precision, recall = true_positive / predictions.sum(), true_positive / labels.sum()
    return float(2 * precision * recall / (precision + recall))


def matthews_corrcoef(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Multi-class MCC from the confusion matrix (Gorodkin 2004); 0 when either marginal is constant."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    classes = np.union1d(predictions, labels)
    confusion = np.zeros((classes.size, classes.size), dtype=np.float64)
    np.add.at(confusion, (np.searchsorted(classes, labels), np.searchsorted(classes, predictions)), 1)
    true_counts, predicted_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    total, correct = confusion.sum(), np.trace(confusion)
    covariance = correct * total - true_counts @ predicted_counts
    denominator = np.sqrt((total**2 - predicted_counts @ predicted_counts) * (total**2 - true_counts @ true_counts))
    return float(covariance / denominator) if denominator else 0.0


def pearson(predictions: Sequence[float], labels: Sequence[float]) -> float:
    x, y = np.asarray(predictions, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denominator) if denominator else 0.0


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their positions (as Spearman's rho needs)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size, dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < values.size:
        end = start
        while end + 1 < values.size and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(predictions: Sequence[float], labels: Sequence[float]) -> float:
    return pearson(_average_ranks(np.asarray(predictions, dtype=np.float64)),
                   _average_ranks(np.asarray(labels, dtype=np.float64)))


def normalize_answer(text: str) -> str:
    """Official SQuAD v1.1: lower case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def squad_f1(prediction: str, truth: str) -> float:
    prediction_tokens, truth_tokens = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(truth_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(prediction_tokens), overlap / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: dict[str, str], references: dict[str, Sequence[str]]) -> dict[str, float]:
    """EM and F1 in percent, each the max over an example's gold answers; an unanswered example scores 0."""
    if not references:
        return {"exact_match": 0.0, "f1": 0.0}
    exact = f1 = 0.0
    for example_id, truths in references.items():
        prediction = predictions.get(example_id, "")
        exact += max(squad_exact_match(prediction, truth) for truth in truths)
        f1 += max(squad_f1(prediction, truth) for truth in truths)
    return {"exact_match": 100.0 * exact / len(references), "f1": 100.0 * f1 / len(references)}


def classification_scores(metric_names: Sequence[str], predictions, labels) -> dict[str, float]:
    """The named GLUE metrics in percent (the paper's tables), MCC and correlations included, for one eval split."""
    functions = {"accuracy": accuracy, "f1": binary_f1, "mcc": matthews_corrcoef, "pearson": pearson,
                 "spearman": spearman}
    unknown = [name for name in metric_names if name not in functions]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(functions)}")
    return {name: 100.0 * functions[name](predictions, labels) for name in metric_names}
