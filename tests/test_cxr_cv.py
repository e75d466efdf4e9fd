"""The v3 CV driver of the CXR infection-map bundle (monai_covid.cxr_cv): nested detector figures, a real short
training run on the grouped folds that resumes from its checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from monai_covid import cxr_cv
from tests.test_cxr_detector import _synthetic_set

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "covid_cxr_infection_map_unet"

pytestmark = pytest.mark.usefixtures("one_thread")


def _oof_rows(n_folds: int = 3) -> list[dict]:
    rows = []
    for k in range(n_folds):
        feats, y, kinds = _synthetic_set(10 + k, n=20)
        for i, (f, c, kind) in enumerate(zip(feats, y, kinds)):
            r = {
                "fold": k,
                "covid": c,
                "class_name": kind,
                "image": f"{kind}_{k}_{i}.png",
                "group": f"g{k}_{i}",
                "tp": 80 if c else 0,
                "fp": 20,
                "fn": 20 if c else 0,
                "tn": 1000,
                "tp_lung": 80 if c else 0,  # cut to the lung: 15 of the 20 false-positive pixels were outside it
                "fp_lung": 5,
                "fn_lung": 20 if c else 0,
            }
            r.update({f"img_{n}": v for n, v in f.items()})
            r.update({f"lung_{n}": v for n, v in f.items()})
            rows.append(r)
    return rows


def test_fold_metrics_nested_detectors_on_synthetic_oof(tmp_path) -> None:
    rows = _oof_rows()
    per = cxr_cv.fold_metrics(rows)
    assert {(m["fold"], m["detector"]) for m in per} == {(k, d) for k in range(3) for d in cxr_cv.DETECTORS}
    for m in per:
        assert m["pixel_sen"] == pytest.approx(0.8) and m["pixel_pre"] == pytest.approx(0.8)
        assert m["pixel_f1"] == pytest.approx(0.8) and m["pixel_f2"] == pytest.approx(0.8)
        assert m["pixel_f1_in_lung"] == pytest.approx(160 / 185)
        assert m["n"] == 60
    paper = [m for m in per if m["detector"] == "paper"]
    fitted = [m for m in per if m["detector"] == "logistic_image"]
    # the pneumonia-like maps fool the paper's rule, not the detector fitted on the other folds
    assert np.mean([m["spe_non_covid"] for m in paper]) < 0.2
    assert np.mean([m["spe_non_covid"] for m in fitted]) > 0.85
    assert np.mean([m["det_sen"] for m in fitted]) > 0.85
    # the report writes the table, the curves and a detector per fitted rule
    (tmp_path / "w" / "toy").mkdir(parents=True)
    from monai_covid.io_utils import atomic_write_csv

    atomic_write_csv(tmp_path / "w" / "toy" / "oof.csv", rows, list(rows[0]))
    table = cxr_cv.report(["toy"], tmp_path / "w", tmp_path / "docs", "test")
    assert "mean ± sd" in table and (tmp_path / "docs" / "roc_reliability_v3.png").stat().st_size > 0
    assert (tmp_path / "w" / "toy" / "detector_logistic_image.json").is_file()


def test_single_fold_cross_fits_the_detector_inside_it_by_group(tmp_path) -> None:
    """One trained fold: every X-ray's detector is fitted on other groups of that fold only, CIs by group."""
    rows = [r for r in _oof_rows() if r["fold"] == 0]
    rows[1]["group"] = rows[0]["group"]  # a near-duplicate pair must stay in one sub-fold
    sub = cxr_cv.inner_split(rows, 5)
    assert sub[0] == sub[1] and set(sub) == set(range(5))
    for j in range(5):  # every sub-fold holds every class
        assert {r["class_name"] for r, s in zip(rows, sub) if s == j} == {r["class_name"] for r in rows}
    p, thr = cxr_cv.oof_detection(rows, [], "logistic_image", 0.98)
    assert p.shape == thr.shape == (len(rows),) and np.all((p >= 0) & (p <= 1))
    assert len(set(np.round(thr, 9))) > 1  # one threshold per sub-fold, not one fitted on everything
    per = cxr_cv.fold_metrics(rows, n_boot=200)
    fitted = next(m for m in per if m["detector"] == "logistic_image")
    paper = next(m for m in per if m["detector"] == "paper")
    assert fitted["fitted_on"].startswith("inner") and paper["fitted_on"] == "none"
    assert fitted["spe_non_covid"] > 0.85 and paper["spe_non_covid"] < 0.2
    for m in (fitted, paper):
        lo, hi = m["det_spe_ci"]
        assert lo <= m["det_spe"] <= hi
    assert paper["det_spe_ci"][0] < paper["det_spe_ci"][1]  # resampled groups, not one value
    (tmp_path / "w" / "toy").mkdir(parents=True)
    from monai_covid.io_utils import atomic_write_csv

    atomic_write_csv(tmp_path / "w" / "toy" / "oof.csv", rows, list(rows[0]))
    table = cxr_cv.report(["toy"], tmp_path / "w", tmp_path / "docs", "test", n_boot=100)
    assert "mean ± sd" not in table and "bootstrap over near-duplicate groups" in table
    det = (tmp_path / "w" / "toy" / "oof_detection.csv").read_text().splitlines()
    assert len(det) == len(rows) + 1 and "logistic_image_probability" in det[0]


def test_run_overrides_fixed_epochs_no_selection() -> None:
    ov = cxr_cv.run_overrides("unet", 3, "/data")
    assert ov["datalist_name"] == "cxr_infection_grouped" and ov["fold"] == 3
    assert ov["val_interval"] == ov["max_epochs"] and ov["early_stop_patience"] > ov["max_epochs"]
    assert ov["network_def"]["_target_"] == "UNet"


def test_real_short_training_resumes_from_checkpoint(shared_data, tmp_path) -> None:
    """Two X-ray epochs on the grouped folds of the real data, the second in a new (resumed) workflow."""
    from monai.bundle import ConfigWorkflow

    def workflow(epochs: int, resume: bool):
        ov = cxr_cv.run_overrides(
            "slim",
            0,
            str(shared_data),
            resume=resume,
            every=300,
            extra={"max_epochs": epochs, "image_size": [64, 64], "batch_size": 4},
        )
        ov.update(bundle_root=str(BUNDLE), ckpt_dir=str(tmp_path), output_dir=str(tmp_path))
        wf = ConfigWorkflow(
            config_file=str(BUNDLE / "configs" / "train.json"),
            meta_file=str(BUNDLE / "configs" / "metadata.json"),
            workflow_type="train",
            **ov,
        )
        wf.initialize()
        return wf

    wf = workflow(1, False)
    train_items = wf.parser.get_parsed_content("train_datalist")
    val_items = wf.parser.get_parsed_content("val_datalist")
    assert not {d["group"] for d in train_items} & {d["group"] for d in val_items}
    assert {d["fold"] for d in val_items} == {0} and 0 not in {d["fold"] for d in train_items}
    wf.run()
    first = wf.parser.get_parsed_content("train#trainer").state
    assert first.epoch == 1 and np.isfinite(float(first.output[0]["loss"]))
    assert (tmp_path / "model_final.pt").is_file() and list(tmp_path.glob("resume_checkpoint_epoch=1.pt"))
    wf.finalize()

    wf2 = workflow(2, True)
    trainer = wf2.parser.get_parsed_content("train#trainer")
    started = []
    from ignite.engine import Events

    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: started.append(e.state.epoch))
    wf2.run()
    assert started == [2] and trainer.state.epoch == 2  # continued after epoch 1, did not start again
    assert list(tmp_path.glob("resume_checkpoint_epoch=2.pt"))
    wf2.finalize()


def test_final_run_trains_on_every_xray_and_writes_fp16(tmp_path, monkeypatch) -> None:
    import torch

    from monai_covid import crossval

    seen = []

    def fake_run_all(jobs, bundle, max_jobs):  # stands in for the 2-hour training subprocess
        for key, run_dir, ov, log in jobs:
            seen.append((key, ov))
            run_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"w": torch.ones(2, dtype=torch.float32), "n": torch.tensor(3)}, run_dir / "model_final.pt")

    monkeypatch.setattr(crossval, "_run_all", fake_run_all)
    out = cxr_cv.train_final(BUNDLE, "slim", tmp_path, "/data")
    ((key, ov),) = seen
    assert key == ("slim", "final") and ov["fold"] is None and "part='all'" in ov["train_datalist"]
    assert ov["max_epochs"] == cxr_cv.VARIANTS["slim"]["max_epochs"]
    sd = torch.load(out, weights_only=True)
    assert sd["w"].dtype == torch.float16 and sd["n"].dtype == torch.int64


def test_pick_examples_one_per_outcome() -> None:
    def row(name, cls, p, hit, paper):
        return {
            "image": name,
            "class_name": cls,
            "covid": int(cls == "covid"),
            "fold": 0,
            "logistic_image_probability": p,
            "logistic_image_detected": hit,
            "paper_detected": paper,
        }

    rows = [
        row("c1", "covid", 0.9, 1, 1),
        row("c2", "covid", 0.99, 1, 1),
        row("c3", "covid", 0.1, 0, 1),
        row("n1", "non_covid", 0.2, 0, 1),
        row("n2", "non_covid", 0.3, 0, 0),
        row("n3", "non_covid", 0.95, 1, 1),
        row("m1", "normal", 0.01, 0, 0),
    ]
    picks = dict(cxr_cv.pick_examples(rows))
    assert picks["true alarm"]["image"] == "c2"  # the most confident of its kind
    assert picks["missed COVID-19"]["image"] == "c3"
    assert picks["spared Non-COVID (paper rule fires)"]["image"] == "n1"
    assert picks["false alarm, Non-COVID"]["image"] == "n3"
    assert "false alarm, Normal" not in picks  # none: no row invented


def test_epoch_losses_count_the_last_pass_of_a_resumed_epoch(tmp_path) -> None:
    """A run stopped inside epoch 2 and resumed from the epoch-1 checkpoint logs epoch 2 twice: the curve keeps the
    complete second pass, not a mix of both; the learning-curve figure is written."""
    line = "2026-12-04 17:47:46,384 - INFO - Epoch: {e}/3, Iter: {i}/3 -- train_loss: {x}"
    lines = [line.format(e=1, i=i, x=x) for i, x in ((1, 1.0), (2, 0.8), (3, 0.6))]
    lines += [line.format(e=2, i=i, x=9.0) for i in (1, 2)]  # interrupted pass (killed before iteration 3)
    lines += ["2026-12-04 17:50:00,000 - INFO - some other line"]
    lines += [line.format(e=2, i=i, x=x) for i, x in ((1, 0.5), (2, 0.4), (3, 0.3))]
    lines += [line.format(e=3, i=i, x=0.2) for i in (1, 2, 3)]
    lines += ["2026-12-04 17:58:23,914 - INFO - Epoch[3] Metrics -- val_mean_dice: 0.7473 "]
    log = tmp_path / "slim_cl_fold0.log"
    log.write_text("\n".join(lines) + "\n")
    got = cxr_cv.read_epoch_losses(log)
    assert [e for e, _ in got] == [1, 2, 3]
    np.testing.assert_allclose([x for _, x in got], [0.8, 0.4, 0.2])
    png = cxr_cv.learning_curves(["slim_cl"], tmp_path, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
