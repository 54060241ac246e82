"""GLUE's metrics in numpy, equal to sklearn.metrics' and scipy.stats' on the same inputs.
Predictions and labels are numpy arrays: class ids, scores for a regression, or 0/1 matrices
(examples x classes) for multi-label."""

import numpy as np


def accuracy(predictions, labels):
    return float(np.mean(predictions == labels))


def f1(predictions, labels):
    """Binary F1 of class 1; 0.0 when there is no positive prediction nor label (as sklearn). On
    multi-label 0/1 matrices, over every (example, class) decision at once: micro-F1."""
    true_positives = np.sum((predictions == 1) & (labels == 1))
    positives = np.sum(predictions == 1) + np.sum(labels == 1)  # predicted ones + actual ones
    return float(2 * true_positives / positives) if positives else 0.0


def f1_macro(predictions, labels):
    """The mean over the classes of each one's F1 against all others (as sklearn's 'macro'): over
    the classes that occur, for class ids; over every column, for multi-label 0/1 matrices."""
    if predictions.ndim == 1:
        classes = np.union1d(predictions, labels)
        predictions, labels = predictions[:, None] == classes, labels[:, None] == classes
    return float(np.mean([f1(p, t) for p, t in zip(predictions.T, labels.T, strict=True)]))


f1_micro = f1  # its name for multi-label tasks, as sklearn's average="micro"


def exact_match(predictions, labels):
    """Multi-label: the share of examples whose predicted set is exactly right (subset accuracy)."""
    return float(np.mean(np.all(predictions == labels, axis=1)))


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
