"""GLUE metrics in numpy, matching sklearn.metrics and scipy.stats on the same inputs."""
import numpy as np


def accuracy(preds, labels):
    return float(np.mean(np.asarray(preds) == np.asarray(labels)))


def f1(preds, labels):
    """Binary F1 of class 1; 0.0 when there is no positive prediction nor label (as sklearn)."""
    preds, labels = np.asarray(preds) == 1, np.asarray(labels) == 1
    true_pos = np.sum(preds & labels)
    denominator = 2 * true_pos + np.sum(preds & ~labels) + np.sum(~preds & labels)
    return float(2 * true_pos / denominator) if denominator else 0.0


def matthews_correlation(preds, labels):
    """Multiclass MCC from the confusion matrix; 0.0 when either side has a single class (as sklearn)."""
    classes, encoded = np.unique(np.concatenate([labels, preds]), return_inverse=True)
    true, pred = encoded[:len(labels)], encoded[len(labels):]
    confusion = np.zeros((len(classes), len(classes)))
    np.add.at(confusion, (true, pred), 1)
    true_counts, pred_counts, n = confusion.sum(1), confusion.sum(0), confusion.sum()
    covariance = np.trace(confusion) * n - true_counts @ pred_counts
    variance_true, variance_pred = n * n - true_counts @ true_counts, n * n - pred_counts @ pred_counts
    if variance_true * variance_pred == 0:
        return 0.0
    return float(covariance / np.sqrt(variance_true * variance_pred))


def pearson(x, y):
    """Pearson's r; nan when either input is constant (the correlation is undefined, as in scipy)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    norm = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / norm) if norm > 0 else float("nan")


def average_ranks(x):
    """Ranks 1..n where tied values share the mean of the ranks they span."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    starts_run = np.r_[True, x[order][1:] != x[order][:-1]]
    run_starts = np.flatnonzero(starts_run)
    run_ends = np.r_[run_starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = ((run_starts + run_ends + 1) / 2)[np.cumsum(starts_run) - 1]
    return ranks


def spearman(x, y):
    return pearson(average_ranks(x), average_ranks(y))


METRICS = {"accuracy": accuracy, "f1": f1, "matthews_correlation": matthews_correlation,
           "pearson": pearson, "spearmanr": spearman}


def compute_metrics(metric_names, preds, labels):
    return {name: METRICS[name](preds, labels) for name in metric_names}
