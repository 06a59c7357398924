"""Metrics per task: cases whose answers are known by hand, and scikit-learn's own functions as the oracle."""

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from densenet.data.metrics import compute_metrics, metric_keys, selection_metric
from densenet.data.task import Task

BINARY = Task("binary", ("normal", "pneumonia"))
LABELS = Task("multilabel", ("desert", "sea", "trees"))


def test_binary_by_hand():
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.1], [0.6], [0.35], [0.8]])
    m = compute_metrics(BINARY, y, p)
    # positives outrank negatives in 3 of the 4 pairs (0.35 < 0.6)
    assert m["auroc"] == pytest.approx(0.75) and m["auroc/pneumonia"] == pytest.approx(0.75)
    # ranked 0.8 (+), 0.6 (-), 0.35 (+): precision 1 at the first positive, 2/3 at the second
    assert m["map"] == pytest.approx((1 + 2 / 3) / 2)
    # at 0.5: decisions 0, 1, 0, 1 -> two of four right
    assert m["acc"] == pytest.approx(0.5) and m["error"] == pytest.approx(50.0) and m["hamming"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(0.5)  # precision 1/2, recall 1/2
    assert m["auroc_skipped"] == 0.0
    assert list(m) == metric_keys(BINARY)


def test_perfect_and_reversed_ranking():
    y = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    perfect = compute_metrics(LABELS, y, y * 0.8 + 0.1)
    assert perfect["auroc"] == 1.0 and perfect["map"] == 1.0 and perfect["lrap"] == 1.0
    assert perfect["acc"] == 1.0 and perfect["hamming"] == 0.0 and perfect["error"] == 0.0
    assert perfect["f1_macro"] == 1.0 and perfect["f1_micro"] == 1.0
    reversed_ = compute_metrics(LABELS, y, 1.0 - (y * 0.8 + 0.1))
    assert reversed_["auroc"] == 0.0 and reversed_["acc"] == 0.0 and reversed_["error"] == 100.0


def test_a_label_with_one_class_is_skipped_and_said_so():
    y = np.array([[1, 0, 1], [0, 0, 0], [1, 0, 1], [0, 0, 0]])  # "sea" never present
    p = np.array([[0.9, 0.2, 0.6], [0.2, 0.1, 0.3], [0.8, 0.3, 0.2], [0.1, 0.4, 0.1]])
    m = compute_metrics(LABELS, y, p)
    assert m["auroc_skipped"] == 1.0 and math.isnan(m["auroc/sea"]) and math.isnan(m["ap/sea"])
    assert m["auroc/desert"] == 1.0 and m["auroc/trees"] == pytest.approx(0.75)
    assert m["auroc"] == pytest.approx((1.0 + 0.75) / 2)  # the mean of the labels scored
    constant = compute_metrics(BINARY, np.zeros(3, dtype=int), np.array([0.1, 0.2, 0.3]))
    assert math.isnan(constant["auroc"]) and constant["auroc_skipped"] == 1.0 and constant["acc"] == 1.0


def test_multilabel_against_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (40, 3))
    p = np.clip(y * 0.3 + rng.random((40, 3)) * 0.7, 0, 1)
    m = compute_metrics(LABELS, torch.tensor(y, dtype=torch.float32), torch.tensor(p))
    decided = (p > 0.5).astype(int)
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, p, average="macro"), rel=1e-6)
    assert m["map"] == pytest.approx(skm.average_precision_score(y, p, average="macro"), rel=1e-6)
    assert m["lrap"] == pytest.approx(skm.label_ranking_average_precision_score(y, p), rel=1e-6)
    assert m["hamming"] == pytest.approx(skm.hamming_loss(y, decided))
    assert m["acc"] == pytest.approx(np.mean(decided == y))  # MedMNIST's multi-label ACC: over all entries
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, decided, average="macro"))
    assert m["f1_micro"] == pytest.approx(skm.f1_score(y, decided, average="micro"))
    exact = np.mean(np.all(decided == y, axis=1))
    assert m["error"] == pytest.approx(100 * (1 - exact))  # an image is right only with all its labels right
    assert list(m) == metric_keys(LABELS)


def test_multiclass_errors_and_auroc():
    task = Task.multiclass([str(i) for i in range(6)])
    y = np.array([0, 1, 2, 3, 4, 5])
    p = np.full((6, 6), 0.02)
    p[np.arange(6), [0, 1, 2, 3, 0, 0]] = 0.9  # images 4 and 5 wrong at top-1
    p[5, 5] = 0.01  # image 5's own class scores lowest of six: its one top-5 miss
    p = p / p.sum(1, keepdims=True)
    m = compute_metrics(task, y, p)
    assert m["error"] == pytest.approx(100 * 2 / 6) and m["acc"] == pytest.approx(4 / 6)
    assert m["top5_error"] == pytest.approx(100 * 1 / 6)
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    missing = compute_metrics(task, np.array([0, 1, 1, 0, 2, 3]), p)  # classes 4 and 5 absent
    assert math.isnan(missing["auroc"])
    few = compute_metrics(Task.multiclass(["a", "b", "c"]), np.array([0, 1, 2]), np.eye(3)[[1, 1, 2]])
    assert few["top5_error"] == 0.0 and few["error"] == pytest.approx(100 / 3)
    assert list(m) == metric_keys(task)


def test_selection_rule():
    assert selection_metric(BINARY) == ("auroc", True) and selection_metric(LABELS).name == "auroc"
    rule = selection_metric(Task.multiclass(["a", "b"]))
    assert rule == ("error", False)
    assert rule.better(3.0, 4.0) and not rule.better(5.0, 4.0) and rule.better(9.0, rule.worst)
    auroc = selection_metric(BINARY)
    assert auroc.better(0.9, 0.8) and not auroc.better(math.nan, 0.1) and auroc.better(0.1, math.nan)


def test_thresholds_chosen_on_validation_separate_what_can_be_separated():
    from densenet.data.metrics import choose_thresholds

    y = np.array([[0, 1], [0, 0], [1, 1], [1, 0], [0, 0]])
    p = np.array([[0.10, 0.9], [0.20, 0.3], [0.30, 0.8], [0.35, 0.2], [0.15, 0.1]])  # label 0 separable at 0.3
    for rule in ("youden", "f1"):
        t = choose_thresholds(Task("multilabel", ("a", "b")), y, p, rule=rule)
        decided = Task("multilabel", ("a", "b")).predict(p, threshold=t)
        assert decided[:, 0].tolist() == y[:, 0].tolist()  # all right at the chosen threshold, none at 0.5
        assert t[0] <= 0.3 and t[0] > 0.2
    constant = choose_thresholds(BINARY, np.zeros(3), np.array([0.2, 0.9, 0.4]))
    assert constant.tolist() == [0.5]
