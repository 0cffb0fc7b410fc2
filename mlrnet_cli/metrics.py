"""Classification and ranking metrics in plain numpy (no scikit-learn dependency).

Conventions (the same as scikit-learn's, so numbers can be cross-checked):

* the confusion matrix has true classes on rows and predicted classes on columns;
* a class that is never predicted has precision 0 (not NaN), a class with no true rows has recall 0,
  and F1 is 0 whenever precision + recall is 0;
* macro-F1 averages per-class F1 over all ``num_classes`` classes, micro-F1 pools the counts (for
  single-label classification it equals accuracy);
* ROC-AUC is the Mann-Whitney statistic with tied scores counted as half (average ranks);
* average precision is the step-wise area ``sum_n (R_n - R_{n-1}) P_n`` over distinct score thresholds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from mlrnet_cli.errors import DataError


def _labels(y: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise DataError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{name} must hold integer class ids, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _pair(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    t, p = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise DataError(f"y_true and y_pred differ in length ({t.size} vs {p.size})")
    return t, p


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Fraction of rows whose prediction equals the label (the paper's metric); 0.0 on no rows."""
    t, p = _pair(y_true, y_pred)
    return float((t == p).mean()) if t.size else 0.0


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> np.ndarray:
    """``cm[i, j]`` = number of rows of true class i predicted as j (int64, shape [C, C])."""
    t, p = _pair(y_true, y_pred)
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
        raise DataError(f"class ids must lie in 0..{num_classes - 1}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def per_class_scores(cm: ArrayLike) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1 and support from a confusion matrix (0 where undefined)."""
    cm = np.asarray(cm, dtype=np.int64)
    support = cm.sum(axis=1)
    precision, recall = _safe_div(np.diag(cm), cm.sum(axis=0)), _safe_div(np.diag(cm), support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def macro_f1(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> float:
    """Unweighted mean of the per-class F1 over all classes."""
    f1 = per_class_scores(confusion_matrix(y_true, y_pred, num_classes))["f1"]
    return float(f1.mean()) if f1.size else 0.0


def micro_f1(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> float:
    """F1 of the pooled counts: 2·TP / (2·TP + FP + FN); equals accuracy for single-label data."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    return float(_safe_div(np.trace(cm), cm.sum()))  # every wrong prediction is one FP and one FN: TP / rows


def classification_report(
    y_true: ArrayLike, y_pred: ArrayLike, num_classes: int, class_names: list[str] | None = None
) -> dict[str, Any]:
    """Accuracy, macro/micro-F1, per-class precision/recall/F1/support and the confusion matrix (JSON-ready)."""
    t, p = _pair(y_true, y_pred)
    cm = confusion_matrix(t, p, num_classes)
    scores = per_class_scores(cm)
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise DataError(f"{len(names)} class names for {num_classes} classes")
    per_class = [
        {"class": i, "name": names[i]}
        | {k: float(scores[k][i]) for k in ("precision", "recall", "f1")}
        | {"support": int(scores["support"][i])}
        for i in range(num_classes)
    ]
    return {
        "num_rows": int(t.size),
        "accuracy": accuracy(t, p),
        "macro_f1": float(scores["f1"].mean()) if num_classes else 0.0,
        "micro_f1": micro_f1(t, p, num_classes),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "class_names": names,
    }


# ---------------------------------------------------------------------------------------------
# ranking metrics: how well a score finds the positive rows (e.g. low meta-net weight -> noisy label)


def _ranking(scores: ArrayLike, positives: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positives).astype(bool)
    if s.ndim != 1 or s.shape != y.shape:
        raise DataError(f"scores and positives must be 1-D of equal length, got {s.shape} and {y.shape}")
    if np.isnan(s).any():
        raise DataError("scores contain NaN")
    return s, y


def average_ranks(values: ArrayLike) -> np.ndarray:
    """1-based ranks of ``values`` with ties given the mean of the ranks they span."""
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="mergesort")
    sorted_v = v[order]
    # start of each run of equal values, and the average rank of that run
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], v.size]
    run_rank = (starts + 1 + ends) / 2.0  # mean of starts+1 .. ends
    ranks = np.empty(v.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def roc_auc(scores: ArrayLike, positives: ArrayLike) -> float | None:
    """P(score of a random positive > score of a random negative), ties counting ½; None if one class is absent."""
    s, y = _ranking(scores, positives)
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    if n_pos == 0 or n_neg == 0:
        return None
    u = average_ranks(s)[y].sum() - n_pos * (n_pos + 1) / 2.0  # Mann-Whitney U of the positives
    return float(u / (n_pos * n_neg))


def average_precision(scores: ArrayLike, positives: ArrayLike) -> float | None:
    """Area under the precision-recall steps at each distinct score (high = positive); None without positives."""
    s, y = _ranking(scores, positives)
    n_pos = int(y.sum())
    if n_pos == 0:
        return None
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    # evaluate only at the last row of each run of tied scores: tied rows cross the threshold together
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    tp_at = np.cumsum(y[order])[last].astype(np.float64)
    precision = tp_at / (np.flatnonzero(last) + 1).astype(np.float64)
    return float(np.sum(np.diff(np.r_[0.0, tp_at / n_pos]) * precision))


def precision_at_k(scores: ArrayLike, positives: ArrayLike, k: int) -> float | None:
    """Fraction of positives among the ``k`` highest-scoring rows (stable order on ties); None when k = 0."""
    s, y = _ranking(scores, positives)
    k = min(int(k), s.size)
    if k <= 0:
        return None
    return float(y[np.argsort(-s, kind="mergesort")[:k]].mean())


def detection_report(scores: ArrayLike, positives: ArrayLike) -> dict[str, Any]:
    """ROC-AUC, average precision and precision@k with k = the true number of positives."""
    s, y = _ranking(scores, positives)
    k = int(y.sum())
    return {
        "roc_auc": roc_auc(s, y),
        "average_precision": average_precision(s, y),
        "precision_at_k": precision_at_k(s, y, k),
        "k": k,
        "num_rows": int(s.size),
        "base_rate": float(k / s.size) if s.size else None,
    }


def within_label_report(scores: ArrayLike, positives: ArrayLike, labels: ArrayLike) -> dict[str, Any]:
    """:func:`detection_report` among the rows of each observed label, and each metric's unweighted mean over labels.

    Within a label, a score cannot find noise by the label alone (a per-label switch scores 0.5). A label whose
    rows are all clean or all noisy has no ROC-AUC (and, without noisy rows, no AP or precision@k); it is left
    out of that metric's mean, and ``<metric>_labels_used`` says how many counted."""
    s, y, lab = np.asarray(scores, dtype=np.float64), np.asarray(positives).astype(bool), np.asarray(labels)
    per = {int(c): detection_report(s[lab == c], y[lab == c]) for c in np.unique(lab)}
    out: dict[str, Any] = {"per_label": per}
    for m in ("roc_auc", "average_precision", "precision_at_k"):
        kept = [p[m] for p in per.values() if p[m] is not None]
        out[m] = float(np.mean(kept)) if kept else None
        out[f"{m}_labels_used"] = len(kept)
    return out


def noise_detection(scores: ArrayLike, noisy: ArrayLike, labels: ArrayLike) -> dict[str, Any]:
    """How well ``scores`` (high = noisy) find the noisy rows: over all rows, plus ``within_label`` means."""
    within = within_label_report(scores, noisy, labels)
    return {**detection_report(scores, noisy), "within_label": {k: v for k, v in within.items() if k != "per_label"}}


def label_share(weights: ArrayLike, labels: ArrayLike) -> float | None:
    """The share of the weights' variance that lies between observed labels (the correlation ratio η²): 1 when
    every row of a label gets the same weight (a per-label switch), 0 when each label has the same mean weight.
    None when every row has the same weight. Needs no truth, so it reads a user's own data too."""
    w, lab = np.asarray(weights, dtype=np.float64), np.asarray(labels)
    total = float(((w - w.mean()) ** 2).sum())
    if w.size == 0 or total <= 0.0:
        return None
    within = sum(float(((w[lab == c] - w[lab == c].mean()) ** 2).sum()) for c in np.unique(lab))
    return max(0.0, 1.0 - within / total)


def stage1_loss_score(losses: ArrayLike) -> np.ndarray:
    """The stage-1 loss alone as a noise score: each row's mean loss over the curve's epochs 1..T (epoch 0 is
    the untrained classifier's loss; a one-point curve is used as it is)."""
    arr = np.asarray(losses, dtype=np.float64)
    return arr[:, 1:].mean(axis=1) if arr.shape[1] > 1 else arr[:, 0]
