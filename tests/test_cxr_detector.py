"""The CXR COVID-19 detector on infection maps (monai_covid.cxr_detector): features, fit, threshold, calibration."""

from __future__ import annotations

import numpy as np
import pytest

from monai_covid.cxr_detector import FEATURES, CxrDetector, choose_threshold, fit_logistic, map_features


def _map(rng: np.random.Generator, kind: str, size: int = 64) -> np.ndarray:
    """Synthetic probability maps: COVID-like (bilateral patches), pneumonia-like (one large patch on one side),
    normal (background only)."""
    p = rng.uniform(0.0, 0.05, (size, size))
    yy, xx = np.mgrid[:size, :size]

    def blob(cx: float, cy: float, r: float, peak: float) -> None:
        p[:] = np.maximum(p, peak * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (r * r)))

    if kind == "covid":
        for cx in (size * 0.28, size * 0.72):
            blob(
                cx + rng.uniform(-3, 3),
                size * rng.uniform(0.55, 0.75),
                size * rng.uniform(0.1, 0.16),
                rng.uniform(0.85, 1.0),
            )
    elif kind == "non_covid":
        side = size * (0.28 if rng.uniform() < 0.5 else 0.72)
        blob(side, size * rng.uniform(0.4, 0.7), size * rng.uniform(0.12, 0.2), rng.uniform(0.6, 0.95))
    return p


def _synthetic_set(seed: int, n: int = 60):
    rng = np.random.default_rng(seed)
    kinds = ["covid"] * n + ["non_covid"] * n + ["normal"] * n
    rows = [map_features(_map(rng, k)) for k in kinds]
    return rows, [int(k == "covid") for k in kinds], kinds


def test_map_features_lung_region_and_bilateral() -> None:
    p = np.zeros((20, 20))
    p[5:10, 2:6] = 0.9  # left
    lung = np.zeros((20, 20))
    lung[2:18, 1:19] = 1
    f = map_features(p, lung)
    assert f["max_prob"] == pytest.approx(0.9)
    assert f["area"] == pytest.approx(20 / lung.sum())
    assert f["bilateral"] == 0.0  # nothing on the right side
    p[5:10, 14:18] = 0.8  # right as well
    assert map_features(p, lung)["bilateral"] > 0
    # outside the lung the map does not count; an empty lung mask falls back to the whole image
    q = np.zeros((20, 20))
    q[0:2, 0:2] = 1.0
    assert map_features(q, lung)["area"] == 0.0
    assert map_features(q, np.zeros((20, 20)))["area"] == pytest.approx(4 / 400)
    assert set(map_features(q)) == set(FEATURES)
    with pytest.raises(ValueError, match="differ in size"):
        map_features(q, np.ones((10, 10)))


def test_paper_rule_each_side_of_threshold() -> None:
    det = CxrDetector.paper()
    p = np.zeros((32, 32))
    p[10, 10] = 0.49
    assert not det(p)["covid_detected"]
    p[10, 11] = 0.51
    out = det(p)
    assert out["covid_detected"] and out["covid_probability"] == pytest.approx(0.51)


def test_fit_on_synthetic_features_separates_covid_from_both_other_classes(tmp_path) -> None:
    rows, y, kinds = _synthetic_set(0)
    det = CxrDetector.fit(rows, y, classes=kinds, min_specificity=0.98)
    # the paper's rule fires on the pneumonia-like maps; the fitted detector does not
    assert np.mean([r["max_prob"] >= 0.5 for r, k in zip(rows, kinds) if k == "non_covid"]) > 0.9
    test_rows, ty, tkinds = _synthetic_set(1)
    pr = det.probability(test_rows)
    detected = pr >= det.threshold
    ty, tkinds = np.array(ty), np.array(tkinds)
    assert detected[ty == 1].mean() >= 0.9
    for k in ("non_covid", "normal"):
        assert 1 - detected[tkinds == k].mean() >= 0.9
    # a map on each side of the threshold: one COVID-like and one pneumonia-like picture
    rng = np.random.default_rng(5)
    assert det(_map(rng, "covid"))["covid_detected"]
    assert not det(_map(rng, "non_covid"))["covid_detected"]
    # the stored detector gives the same probabilities
    again = CxrDetector.load(det.save(tmp_path / "detector.json"))
    np.testing.assert_allclose(again.probability(test_rows), pr)
    assert again.threshold == det.threshold and again.features == det.features
    assert CxrDetector.load(None).rule == "paper"


def test_calibration_monotone_and_calibrated_on_its_training_data() -> None:
    rows, y, kinds = _synthetic_set(2)
    det = CxrDetector.fit(rows, y, classes=kinds, features=("max_prob",))
    # one feature: probability strictly increasing in max p (the weight is positive)
    grid = [{"max_prob": v} for v in np.linspace(0.01, 0.99, 50)]
    pr = det.probability(grid)
    assert det.weights[0] > 0 and np.all(np.diff(pr) > 0)
    # a logistic fit with an intercept reproduces the positive rate on its training data
    full = CxrDetector.fit(rows, y, classes=kinds, l2=1e-6)
    assert full.probability(rows).mean() == pytest.approx(np.mean(y), abs=0.01)
    # raising the probabilities of a map never lowers the score of a fitted 'max p' detector
    rng = np.random.default_rng(3)
    m = _map(rng, "non_covid")
    assert det(np.clip(m * 1.2, 0, 1))["covid_probability"] >= det(m)["covid_probability"]


def test_choose_threshold_meets_specificity_per_class() -> None:
    probs = [0.9, 0.8, 0.7] + [0.1] * 49 + [0.75] + [0.2] * 50 + [0.6]
    labels = [1, 1, 1] + [0] * 50 + [0] * 51
    classes = ["covid"] * 3 + ["non_covid"] * 50 + ["normal"] * 51
    t = choose_threshold(probs, labels, classes, min_specificity=0.98)
    p, c = np.array(probs), np.array(classes)
    for k in ("non_covid", "normal"):
        assert (p[(c == k)] < t).mean() >= 0.98
    # the lowest such cut-off: one false alarm allowed per class (0.75, 0.6); normal's next score 0.2 must be below
    assert t == pytest.approx((0.2 + 0.6) / 2)
    assert choose_threshold(probs, labels, classes, min_specificity=1.0) == pytest.approx((0.75 + 0.8) / 2)


def test_fit_logistic_recovers_weights_and_needs_both_classes() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(4000, 2))
    y = (rng.uniform(size=4000) < 1 / (1 + np.exp(-(2.0 * X[:, 0] - 1.0 * X[:, 1] + 0.5)))).astype(int)
    w, b = fit_logistic(X, y, l2=1e-6)
    np.testing.assert_allclose(w, [2.0, -1.0], atol=0.2)
    assert b == pytest.approx(0.5, abs=0.15)
    with pytest.raises(ValueError, match="both classes"):
        fit_logistic(X, np.zeros(4000))


def test_writer_and_predict_use_the_detector(tmp_path) -> None:
    import torch

    from monai_covid.infection_map import InfectionMapWriter, predict_cxr

    rows, y, kinds = _synthetic_set(4)
    det = CxrDetector.fit(rows, y, classes=kinds)
    path = det.save(tmp_path / "detector.json")
    rng = np.random.default_rng(7)
    pneumonia = _map(rng, "non_covid")
    image = np.full(pneumonia.shape, 0.5, dtype=np.float32)
    paper_row = InfectionMapWriter(tmp_path / "paper").write_one(pneumonia, image, "a.png")
    fitted_row = InfectionMapWriter(tmp_path / "fitted", detector=str(path)).write_one(pneumonia, image, "a.png")
    assert paper_row["covid_detected"] == 1  # max p >= 0.5
    assert fitted_row["covid_detected"] == 0
    assert float(fitted_row["covid_probability"]) == pytest.approx(det(pneumonia)["covid_probability"], abs=1e-4)
    assert fitted_row["infected_area_percent"] == paper_row["infected_area_percent"]  # the map itself is unchanged
    with pytest.raises(ValueError, match="lung"):
        InfectionMapWriter(tmp_path / "x", detector=CxrDetector(weights=[1.0], features=("area",), use_lung=True))

    class Constant(torch.nn.Module):  # logits of the pneumonia-like map
        def forward(self, x):
            p = torch.as_tensor(np.clip(pneumonia, 1e-6, 1 - 1e-6), dtype=torch.float32)[None, None]
            return torch.log(p / (1 - p))

    out = predict_cxr(Constant(), image, image_size=pneumonia.shape, detector=det)
    assert out["covid_detected"] is False and out["covid_probability"] < det.threshold
    assert predict_cxr(Constant(), image, image_size=pneumonia.shape)["covid_detected"]


def test_bundle_detector_follows_inference_json(tmp_path) -> None:
    """``detector: null`` is the paper's rule; a JSON path expression (as shipped) loads the fitted detector."""
    import json
    import shutil
    from pathlib import Path

    from monai_covid.cxr_detector import bundle_detector

    src = (
        Path(__file__).resolve().parents[1] / "bundles" / "covid_cxr_infection_map_unet" / "configs" / "inference.json"
    )
    bundle = tmp_path / "b"
    (bundle / "configs").mkdir(parents=True)
    cfg = json.loads(src.read_text())
    cfg["detector"] = None
    (bundle / "configs" / "inference.json").write_text(json.dumps(cfg))
    assert bundle_detector(bundle).rule == "paper" and bundle_detector(bundle).threshold == cfg["threshold"]
    rows, y, kinds = _synthetic_set(5)
    det = CxrDetector.fit(rows, y, classes=kinds)
    det.save(bundle / "models" / "detector.json")
    cfg["detector"] = "$@bundle_root + '/models/detector.json'"
    (bundle / "configs" / "inference.json").write_text(json.dumps(cfg))
    for loaded in (bundle_detector(bundle), bundle_detector(bundle, cfg)):  # from the file, or an already-read config
        assert loaded.rule == "logistic" and loaded.threshold == pytest.approx(det.threshold)
        assert loaded.weights == pytest.approx(det.weights)
    lung = CxrDetector.fit(rows, y, classes=kinds, use_lung=True)
    lung.save(bundle / "models" / "detector.json")
    with pytest.raises(ValueError, match="lung"):
        bundle_detector(bundle)


def test_evaluation_report_counts_detections_with_the_detector() -> None:
    """``SegmentationDetectionReport(detector=...)`` (evaluate.json ``detector``): the image-level call is the
    detector's; pixel counts do not change."""
    from monai_covid.detection_metrics import SegmentationDetectionReport

    rows, y, kinds = _synthetic_set(6)
    det = CxrDetector.fit(rows, y, classes=kinds)
    rng = np.random.default_rng(8)
    maps = [(_map(rng, "covid"), 1), (_map(rng, "non_covid"), 0), (_map(rng, "normal"), 0)]
    reports = {"paper": SegmentationDetectionReport(), "fitted": SegmentationDetectionReport(detector=det)}
    for rep in reports.values():
        for m, positive in maps:
            rep.update(m[None], (m > 0.5)[None] if positive else np.zeros((1, *m.shape), bool), positive)
    paper, fitted = (reports[k].compute() for k in ("paper", "fitted"))
    assert paper["detector"] == "paper" and fitted["detector"] == "logistic"
    assert paper["image_level_detection"]["fp"] == 1  # the pneumonia-like map has pixels >= 0.5
    assert fitted["image_level_detection"]["fp"] == 0 and fitted["image_level_detection"]["tp"] == 1
    assert paper["pixel_level_on_positive_images"] == fitted["pixel_level_on_positive_images"]
