import math

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as sk

import metrics

rng = np.random.default_rng(0)
CLASS_CASES = [
    (rng.integers(0, 2, 200), rng.integers(0, 2, 200)),  # random binary
    (rng.integers(0, 3, 200), rng.integers(0, 3, 200)),  # random 3-class (MNLI)
    (np.ones(10, int), np.ones(10, int)),  # one class only, all correct
    (np.zeros(10, int), rng.integers(0, 2, 10)),  # constant predictions
    (np.array([0, 0, 0]), np.array([0, 0, 0])),  # no positives anywhere
    (np.array([1, 0, 1, 1]), np.array([0, 1, 0, 0])),  # everything wrong
]


@pytest.mark.parametrize("preds,labels", CLASS_CASES)
def test_classification_metrics_match_sklearn(preds, labels):
    assert metrics.accuracy(preds, labels) == pytest.approx(sk.accuracy_score(labels, preds))
    assert metrics.matthews_correlation(preds, labels) == pytest.approx(
        sk.matthews_corrcoef(labels, preds)
    )
    if max(preds.max(), labels.max()) <= 1:
        assert metrics.f1(preds, labels) == pytest.approx(
            sk.f1_score(labels, preds, zero_division=0.0)
        )


REGRESSION_CASES = [
    (rng.normal(size=100), rng.normal(size=100)),
    (rng.integers(0, 5, 100).astype(float), rng.integers(0, 5, 100).astype(float)),  # many ties
    (np.array([1.0, 2.0, 2.0, 3.0, 3.0, 3.0]), np.array([3.0, 1.0, 2.0, 2.0, 5.0, 5.0])),
    (np.arange(50.0), np.arange(50.0) ** 3),  # monotone: spearman 1, pearson < 1
]


@pytest.mark.parametrize("x,y", REGRESSION_CASES)
def test_correlations_match_scipy(x, y):
    assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert metrics.spearmanr(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)


def test_spearman_ranks_ties_as_scipy_does():
    x = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5])
    y = np.array([2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4])
    assert metrics.spearmanr(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)


@pytest.mark.parametrize(
    "preds,labels", [*CLASS_CASES, (np.array([0, 1, 2, 2]), np.array([0, 1, 1, 0]))]
)  # the last predicts a class no label has: it still counts, with an F1 of 0
def test_macro_f1_matches_sklearn(preds, labels):
    expected = sk.f1_score(labels, preds, average="macro", zero_division=0.0)
    assert metrics.f1_macro(preds, labels) == pytest.approx(expected)


def test_constant_input_gives_nan_correlation():
    assert math.isnan(metrics.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(metrics.spearmanr([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]))


MULTI_LABEL_CASES = [
    (rng.integers(0, 2, (50, 4)), rng.integers(0, 2, (50, 4))),  # random sets of 4 classes
    (np.zeros((6, 3), int), rng.integers(0, 2, (6, 3))),  # the empty set predicted everywhere
    (np.zeros((4, 3), int), np.zeros((4, 3), int)),  # no class anywhere: all sets empty, right
    (np.array([[1, 0, 0], [0, 1, 1]]), np.array([[1, 0, 0], [0, 1, 0]])),  # a class never true
]


@pytest.mark.parametrize("preds,labels", MULTI_LABEL_CASES)
def test_multi_label_metrics_match_sklearn(preds, labels):
    labels = labels.astype(np.float32)  # as a run holds them: the binary cross-entropy's targets
    assert metrics.f1_micro(preds, labels) == pytest.approx(
        sk.f1_score(labels, preds, average="micro", zero_division=0.0)
    )
    assert metrics.f1_macro(preds, labels) == pytest.approx(
        sk.f1_score(labels, preds, average="macro", zero_division=0.0)
    )
    assert metrics.exact_match(preds, labels) == pytest.approx(sk.accuracy_score(labels, preds))
