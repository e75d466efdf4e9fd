"""Binary metrics and the paper's 95% CI r = 1.96 sqrt(m (1 - m) / N)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from monai_covid.detection_metrics import BinaryCounts, binary_counts, binary_metrics, confidence_radius


def test_counts_and_metrics():
    pred = np.array([1, 1, 1, 0, 0, 0, 0, 1, 0, 0])
    target = np.array([1, 1, 0, 1, 0, 0, 0, 1, 0, 0])
    c = binary_counts(pred, target)
    assert (c.tp, c.fp, c.tn, c.fn) == (3, 1, 5, 1)
    m = binary_metrics(pred, target)
    assert m["sensitivity"] == pytest.approx(0.75) and m["specificity"] == pytest.approx(5 / 6)
    assert m["precision"] == pytest.approx(0.75) and m["accuracy"] == pytest.approx(0.8)
    assert m["f1"] == pytest.approx(0.75)
    assert m["f2"] == pytest.approx(5 * 0.75 * 0.75 / (4 * 0.75 + 0.75))
    assert m["sensitivity_ci"] == pytest.approx(1.96 * math.sqrt(0.75 * 0.25 / 4))
    assert m["specificity_ci"] == pytest.approx(1.96 * math.sqrt((5 / 6) * (1 / 6) / 6))
    assert m["f1_ci"] == pytest.approx(1.96 * math.sqrt(0.75 * 0.25 / 10))


def test_accumulate_and_edge_cases():
    c = BinaryCounts()
    c += binary_counts(np.ones((2, 2)), np.ones((2, 2)))
    c += binary_counts(np.zeros((2, 2)), np.zeros((2, 2)))
    m = c.metrics()
    assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0 and m["sensitivity_ci"] == 0.0 and m["n"] == 8
    none = binary_counts(np.zeros(5), np.array([1, 0, 0, 0, 0])).metrics()
    assert none["f1"] == 0.0 and math.isnan(none["precision"]) and math.isnan(none["precision_ci"])
    assert math.isnan(confidence_radius(0.5, 0))
    with pytest.raises(ValueError):
        binary_counts(np.zeros(3), np.zeros(4))
