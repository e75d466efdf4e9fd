"""Calibration, threshold and group-bootstrap helpers of monai_covid.classifier_cv, and the JPEG augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_prep.artefacts import RandJpegArtefact, RandJpegArtefactd, jpeg_roundtrip
from monai_covid import classifier_cv as cv


def test_platt_recovers_a_known_calibration() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, 20000)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-(0.5 * z - 1.0)))).astype(int)  # true p = sigmoid(0.5 z - 1)
    a, b = cv.fit_platt(z, y)
    assert a == pytest.approx(0.5, abs=0.05) and b == pytest.approx(-1.0, abs=0.08)
    p = cv.apply_platt(z, (a, b))
    assert cv.expected_calibration_error(y, p) < 0.03
    assert cv.expected_calibration_error(y, 1 / (1 + np.exp(-z))) > 0.1  # the raw sigmoid is over-confident


def test_metrics_threshold_and_bootstrap() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.7, 0.6, 0.8, 0.9])
    m = cv.binary_metrics(y, p, 0.5)
    # TP 3, FP 1, TN 2, FN 0
    assert m["sensitivity"] == 1.0 and m["specificity"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(6 / 7) and m["auc"] == pytest.approx(8 / 9)
    t = cv.best_f1_threshold(y, p)
    assert 0.7 < t < 0.8 or (0.2 < t < 0.6 and cv.binary_metrics(y, p, t)["f1"] >= 6 / 7)
    assert cv.binary_metrics(y, p, t)["f1"] == max(cv.binary_metrics(y, p, s)["f1"] for s in np.linspace(0, 1, 101))
    groups = ["a", "a", "b", "c", "c", "d"]
    lo, hi = cv.group_bootstrap_ci(y, p, groups, lambda yy, pp: cv.binary_metrics(yy, pp, 0.5)["auc"], n_boot=300)
    assert 0.0 <= lo <= hi <= 1.0 and lo < m["auc"] or hi == 1.0
    full = cv.metrics_with_ci(y, p, groups, 0.5, n_boot=200)
    assert full["groups"] == 4 and full["n"] == 6 and full["f1_ci"][0] <= full["f1"] <= full["f1_ci"][1]


def test_reliability_bins_cover_every_prediction() -> None:
    rng = np.random.default_rng(3)
    p = rng.random(500)
    y = (rng.random(500) < p).astype(int)
    bins = cv.reliability_bins(y, p, n_bins=5)
    assert sum(b["n"] for b in bins) == 500
    assert all(abs(b["mean_prob"] - b["observed"]) < 0.12 for b in bins)


def test_evaluate_scores_nested_calibration() -> None:
    """OOF figures use a calibration/threshold fitted on the other folds only, external ones all OOF rows."""
    rng = np.random.default_rng(4)
    rows = []
    for k in range(5):
        for i in range(40):
            y = i % 2
            rows.append({"set": "oof", "model": k, "fold": k, "image": f"f{k}_{i}", "label": y, "group": f"g{k}_{i // 4}",
                         "logit": rng.normal(3 if y else -3, 2)})
    for k in range(5):
        for i in range(30):
            y = i % 2
            rows.append({"set": "ext", "model": k, "fold": -1, "image": f"e{i}", "label": y, "group": f"p{i // 3}",
                         "logit": rng.normal(1 if y else -1, 2)})
    res = cv.evaluate_scores(rows, n_boot=100)
    assert len(res["cv"]["threshold"]) == 5 and res["cv"]["n"] == 200 and res["cv"]["groups"] == 50
    assert res["cv"]["auc"] > 0.9 and res["external"]["n"] == 30 and res["external"]["groups"] == 10
    assert res["external"]["auc"] < res["cv"]["auc"]


def test_jpeg_roundtrip_and_random_transform() -> None:
    yy, xx = np.mgrid[:64, :64]
    img = ((np.sin(xx / 3.0) * np.cos(yy / 5.0) + 1) / 2)[None].astype(np.float32)
    low = jpeg_roundtrip(img, 10)
    high = jpeg_roundtrip(img, 95)
    assert low.shape == img.shape and low.dtype == np.float32
    assert np.abs(high - img).mean() < np.abs(low - img).mean() < 0.1  # lower quality, larger artefacts
    t = jpeg_roundtrip(torch.as_tensor(img), 30)
    assert torch.is_tensor(t) and np.allclose(t.numpy(), jpeg_roundtrip(img, 30))
    assert RandJpegArtefact(prob=0.0)(img) is img
    d = RandJpegArtefactd(keys="image", prob=1.0, quality_range=(10, 10))
    d.set_random_state(0)
    assert np.allclose(d({"image": img})["image"], low)
    with pytest.raises(ValueError):
        RandJpegArtefact(quality_range=(50, 20))
