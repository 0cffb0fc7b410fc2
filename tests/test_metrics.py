"""Metrics against hand-computed values (mlrnet_cli.metrics)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlrnet_cli import metrics
from mlrnet_cli.errors import DataError

# true:  0 0 1 1 2 2 ; predicted: 0 1 1 1 0 0 ; class 2 is never predicted, class 3 never occurs
Y_TRUE = [0, 0, 1, 1, 2, 2]
Y_PRED = [0, 1, 1, 1, 0, 0]


def test_confusion_matrix_rows_true_cols_predicted() -> None:
    cm = metrics.confusion_matrix(Y_TRUE, Y_PRED, 4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [2, 0, 0, 0], [0, 0, 0, 0]]


def test_per_class_with_a_class_absent_from_predictions() -> None:
    s = metrics.per_class_scores(metrics.confusion_matrix(Y_TRUE, Y_PRED, 4))
    np.testing.assert_allclose(s["precision"], [1 / 3, 2 / 3, 0.0, 0.0])
    np.testing.assert_allclose(s["recall"], [1 / 2, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(s["f1"], [0.4, 0.8, 0.0, 0.0])
    assert s["support"].tolist() == [2, 2, 2, 0]
    assert not np.isnan(s["precision"]).any()


def test_accuracy_and_f1s() -> None:
    assert metrics.accuracy(Y_TRUE, Y_PRED) == pytest.approx(0.5)
    assert metrics.micro_f1(Y_TRUE, Y_PRED, 3) == pytest.approx(0.5)
    assert metrics.macro_f1(Y_TRUE, Y_PRED, 3) == pytest.approx((0.4 + 0.8 + 0.0) / 3)
    assert metrics.macro_f1(Y_TRUE, Y_PRED, 4) == pytest.approx(1.2 / 4)


def test_classification_report_json_ready() -> None:
    import json

    rep = metrics.classification_report(Y_TRUE, Y_PRED, 3, ["a", "b", "c"])
    json.dumps(rep)
    assert rep["accuracy"] == pytest.approx(0.5)
    assert rep["macro_f1"] == pytest.approx(0.4)
    assert rep["per_class"][2] == {"class": 2, "name": "c", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert rep["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [2, 0, 0]]
    assert rep["num_rows"] == 6


def test_bad_inputs_raise_data_error() -> None:
    with pytest.raises(DataError):
        metrics.accuracy([0, 1], [0])
    with pytest.raises(DataError):
        metrics.confusion_matrix([0, 5], [0, 1], 3)
    with pytest.raises(DataError):
        metrics.classification_report([0], [0], 2, ["only-one"])


def test_average_ranks_ties() -> None:
    np.testing.assert_allclose(metrics.average_ranks([3.0, 1.0, 3.0, 2.0, 3.0]), [4, 1, 4, 2, 4])


def _pairwise_auc(scores: list[float], pos: list[bool]) -> float:
    p = [s for s, y in zip(scores, pos, strict=True) if y]
    n = [s for s, y in zip(scores, pos, strict=True) if not y]
    total = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(p, n))
    return total / (len(p) * len(n))


def test_roc_auc_toy_with_ties_by_hand() -> None:
    scores = [0.1, 0.4, 0.35, 0.8, 0.4]
    pos = [False, False, True, True, True]
    # pairs (pos, neg): .35>.1, .35<.4, .8>.1, .8>.4, .4>.1, .4=.4 -> (1+0+1+1+1+.5)/6
    assert metrics.roc_auc(scores, pos) == pytest.approx(4.5 / 6)
    assert metrics.roc_auc(scores, pos) == pytest.approx(_pairwise_auc(scores, pos))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=2, max_size=30))
def test_roc_auc_equals_pairwise(rows: list[tuple[int, bool]]) -> None:
    scores = [float(s) for s, _ in rows]
    pos = [y for _, y in rows]
    got = metrics.roc_auc(scores, pos)
    if all(pos) or not any(pos):
        assert got is None
    else:
        assert got == pytest.approx(_pairwise_auc(scores, pos))


def test_average_precision_by_hand() -> None:
    # ranks: + - + -  -> P@1 = 1, P@3 = 2/3 -> AP = (1 + 2/3) / 2
    assert metrics.average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    # tied scores cross the threshold together: {0.9}: P=1 R=.5 ; {0.5, 0.5}: P=2/3 R=1
    assert metrics.average_precision([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert metrics.average_precision([0.3, 0.2], [0, 0]) is None


def test_precision_at_k_and_detection_report() -> None:
    assert metrics.precision_at_k([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0], 2) == pytest.approx(0.5)
    assert metrics.precision_at_k([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0], 0) is None
    rep = metrics.detection_report([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0])
    assert rep["k"] == 2
    assert rep["precision_at_k"] == pytest.approx(0.5)
    assert rep["roc_auc"] == pytest.approx(0.75)
    assert rep["average_precision"] == pytest.approx(5 / 6)
    assert rep["base_rate"] == pytest.approx(0.5)


def test_within_label_report_ignores_what_the_label_alone_tells() -> None:
    """A score that only follows the label (a per-label switch) finds noise overall but is at chance within
    each label; a score that ranks noise inside every label is perfect within labels."""
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    noisy = np.array([1, 1, 1, 0, 0, 0, 1, 0], dtype=bool)
    switch = np.where(labels == 0, 0.9, 0.1)
    rep = metrics.noise_detection(switch, noisy, labels)
    # 16 noisy/clean pairs: 9 won (0.9 over 0.1), 6 tied (half each), 1 lost
    assert rep["roc_auc"] == pytest.approx(12 / 16)
    assert rep["within_label"]["roc_auc"] == pytest.approx(0.5) and rep["within_label"]["roc_auc_labels_used"] == 2
    inside = np.array([0.8, 0.7, 0.6, 0.1, 0.2, 0.3, 0.9, 0.4])
    assert metrics.noise_detection(inside, noisy, labels)["within_label"]["roc_auc"] == 1.0


def test_stage1_loss_score_leaves_out_the_untrained_epoch() -> None:
    curves = np.array([[5.0, 1.0, 3.0], [0.0, 2.0, 2.0]])
    np.testing.assert_allclose(metrics.stage1_loss_score(curves), [2.0, 2.0])
    np.testing.assert_allclose(metrics.stage1_loss_score(curves[:, :1]), [5.0, 0.0])


def test_label_share_is_the_between_label_share_of_the_variance() -> None:
    labels = np.array([0, 0, 1, 1])
    assert metrics.label_share([0.9, 0.9, 0.1, 0.1], labels) == pytest.approx(1.0)  # a per-label switch
    assert metrics.label_share([0.9, 0.1, 0.9, 0.1], labels) == pytest.approx(0.0)  # equal label means
    # label means 0.5 and 0.2 around 0.35: between 4 * 0.15² = 0.09; total 0.09 + (0.4² + 0.4² + 0.1² + 0.1²) = 0.43
    assert metrics.label_share([0.9, 0.1, 0.3, 0.1], labels) == pytest.approx(0.09 / 0.43)
    assert metrics.label_share([0.5, 0.5, 0.5, 0.5], labels) is None
