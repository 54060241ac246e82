"""GLUE's metrics in numpy, equal to sklearn.metrics' and scipy.stats' on the same inputs.
Predictions and labels are numpy arrays: class ids, or scores for a regression."""

import numpy as np


def accuracy(predictions, labels):
    return float(np.mean(predictions == labels))


def f1(predictions, labels):
    """Binary F1 of class 1; 0.0 when there is no positive prediction nor label (as sklearn)."""
    true_positives = np.sum((predictions == 1) & (labels == 1))
    positives = np.sum(predictions == 1) + np.sum(labels == 1)  # predicted ones + actual ones
    return float(2 * true_positives / positives) if positives else 0.0


def f1_macro(predictions, labels):
    """The mean over the classes of each one's F1 against all others (as sklearn's 'macro')."""
    classes = np.union1d(predictions, labels)
    return float(np.mean([f1(predictions == c, labels == c) for c in classes]))


def matthews_correlation(predictions, labels):
    """Multiclass MCC from the confusion matrix; 0.0 when either side has one class (as sklearn)."""
    classes = int(max(predictions.max(), labels.max())) + 1
    confusion = np.zeros((classes, classes))
    np.add.at(confusion, (labels, predictions), 1)  # rows: the true class, columns: predicted
    n, actual, predicted = confusion.sum(), confusion.sum(1), confusion.sum(0)
    covariance = np.trace(confusion) * n - actual @ predicted
    denominator = np.sqrt((n * n - actual @ actual) * (n * n - predicted @ predicted))
    return float(covariance / denominator) if denominator else 0.0


def pearson(x, y):
    """Pearson's r; nan when either input is constant (the correlation is undefined, as scipy)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    norm = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / norm) if norm > 0 else float("nan")


def spearmanr(x, y):
    """Pearson's r of the ranks, tied values sharing the mean of the ranks they span."""
    ranks = []
    for values in (x, y):
        _, group, size = np.unique(values, return_inverse=True, return_counts=True)
        last = np.cumsum(size)  # a group of k ties spans the ranks last - k + 1 .. last
        ranks.append((last - (size - 1) / 2)[group])
    return pearson(*ranks)
