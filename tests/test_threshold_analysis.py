"""Threshold sweep, ROC / PR curves and confusion matrix against a hand-computed case (paper 002 Sec. IV-D/E)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from monai_covid.threshold_analysis import (
    PAPER_THRESHOLDS,
    average_precision,
    confusion_counts,
    pr_curve,
    roc_auc,
    roc_curve,
    save_threshold_report,
    threshold_sweep,
)

# 4 COVID, 6 non-COVID; positive when probability >= threshold
Y_TRUE = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
Y_PROB = [0.95, 0.75, 0.55, 0.35, 0.85, 0.65, 0.45, 0.25, 0.15, 0.05]

# threshold: (tp, fp, tn, fn, sensitivity, specificity, precision, f1), worked out by hand
EXPECTED = {
    0.1: (4, 5, 1, 0, 1.0, 1 / 6, 4 / 9, 8 / 13),
    0.35: (4, 3, 3, 0, 1.0, 0.5, 4 / 7, 8 / 11),  # 0.35 itself counts as positive
    0.5: (3, 2, 4, 1, 0.75, 4 / 6, 0.6, 2 / 3),
    0.9: (1, 0, 6, 3, 0.25, 1.0, 1.0, 0.4),
}


@pytest.mark.parametrize("threshold", sorted(EXPECTED))
def test_sweep_matches_hand_computation(threshold: float) -> None:
    row = threshold_sweep(Y_TRUE, Y_PROB, [threshold])[0]
    tp, fp, tn, fn, sens, spec, prec, f1 = EXPECTED[threshold]
    assert (row["tp"], row["fp"], row["tn"], row["fn"]) == (tp, fp, tn, fn)
    assert row["sensitivity"] == pytest.approx(sens)
    assert row["specificity"] == pytest.approx(spec)
    assert row["precision"] == pytest.approx(prec)
    assert row["f1"] == pytest.approx(f1)
    assert row["accuracy"] == pytest.approx((tp + tn) / 10)


def test_paper_thresholds_and_zero_division() -> None:
    rows = threshold_sweep(Y_TRUE, Y_PROB)
    assert len(rows) == len(PAPER_THRESHOLDS) == 9
    assert all(math.isclose(r["threshold"], 0.1 * k) for r, k in zip(rows, range(1, 10)))
    sens = [r["sensitivity"] for r in rows]
    assert sens == sorted(sens, reverse=True)  # sensitivity can only fall as the threshold rises
    none_called = threshold_sweep(Y_TRUE, Y_PROB, [0.99])[0]
    assert none_called["tp"] == none_called["fp"] == 0 and math.isnan(none_called["precision"])


def test_roc_and_pr_by_hand() -> None:
    # 18 of the 24 (COVID, non-COVID) pairs are ranked correctly
    assert roc_auc(Y_TRUE, Y_PROB) == pytest.approx(18 / 24)
    fpr, tpr, thr = roc_curve(Y_TRUE, Y_PROB)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(18 / 24)
    # precision at each recall step: 1/1, 2/3, 3/5, 4/7
    assert average_precision(Y_TRUE, Y_PROB) == pytest.approx(0.25 * (1 + 2 / 3 + 3 / 5 + 4 / 7))
    precision, recall, _ = pr_curve(Y_TRUE, Y_PROB)
    assert precision[0] == 1.0 and recall[-1] == 1.0 and precision[-1] == pytest.approx(0.4)


def test_ties_and_perfect_separation() -> None:
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == pytest.approx(1.0)
    assert average_precision([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == pytest.approx(1.0)
    assert confusion_counts([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 0.5) == {"tp": 2, "fp": 0, "tn": 2, "fn": 0}
    with pytest.raises(ValueError):
        threshold_sweep([0, 2], [0.1, 0.2])


def test_report_files(tmp_path) -> None:
    summary = save_threshold_report(Y_TRUE, Y_PROB, tmp_path, command="python -m x", cases=[f"c{i}" for i in range(10)])
    assert summary["roc_auc"] == pytest.approx(0.75) and summary["f1"] == pytest.approx(2 / 3)
    with open(tmp_path / "threshold_sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and float(rows[4]["threshold"]) == pytest.approx(0.5)
    assert float(rows[4]["sensitivity"]) == pytest.approx(0.75)
    with open(tmp_path / "confusion_matrix.csv") as f:
        cm = list(csv.reader(f))
    assert cm[1][1:] == ["3", "1"] and cm[2][1:] == ["2", "4"]
    assert json.loads((tmp_path / "summary.json").read_text())["command"] == "python -m x"
    for name in ("roc_curve", "pr_curve", "confusion_matrix", "score_histogram"):
        png = tmp_path / f"{name}.png"
        assert png.stat().st_size < 300_000
        assert np.asarray(Image.open(png)).std() > 0
    assert not list(tmp_path.glob("*.part*"))
