"""GLUE metrics in numpy, matching sklearn.metrics and scipy.stats on the same inputs."""

import numpy as np


def accuracy(preds, labels):
    return float(np.mean(np.asarray(preds) == np.asarray(labels)))


def f1(preds, labels):
    """Binary F1 of class 1; 0.0 when there is no positive prediction nor label (as sklearn)."""
    preds, labels = np.asarray(preds) == 1, np.asarray(labels) == 1
    denominator = (
        preds.sum() + labels.sum()
    )  # (true + false positives) + (true positives + false negatives)
    return float(2 * np.sum(preds & labels) / denominator) if denominator else 0.0


def matthews_correlation(preds, labels):
    """Multiclass MCC from the confusion matrix; 0.0 when either side has one class (as sklearn)."""
    classes, encoded = np.unique(np.concatenate([labels, preds]), return_inverse=True)
    confusion = np.zeros((len(classes), len(classes)))
    np.add.at(
        confusion, (encoded[: len(labels)], encoded[len(labels) :]), 1
    )  # rows: true class, columns: predicted
    true_counts, pred_counts, n = confusion.sum(1), confusion.sum(0), confusion.sum()
    covariance = np.trace(confusion) * n - true_counts @ pred_counts
    variance_true, variance_pred = (
        n * n - true_counts @ true_counts,
        n * n - pred_counts @ pred_counts,
    )
    denominator = np.sqrt(variance_true * variance_pred)
    return float(covariance / denominator) if denominator else 0.0


def pearson(x, y):
    """Pearson's r; nan when either input is constant (the correlation is undefined, as scipy)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    norm = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / norm) if norm > 0 else float("nan")


def average_ranks(x):
    """Ranks 1..n where tied values share the mean of the ranks they span."""
    _, group, group_size = np.unique(x, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(group_size)  # a group of k ties spans ranks last-k+1 .. last; their mean:
    return (last_rank - (group_size - 1) / 2)[group]


def spearman(x, y):
    return pearson(average_ranks(x), average_ranks(y))


METRICS = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearmanr": spearman,
}


def compute_metrics(metric_names, preds, labels):
    return {name: METRICS[name](preds, labels) for name in metric_names}
