"""monai_covid.crossval: per-image scores, the fold summary, and scoring a network on a real CV fold."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from monai_covid.crossval import per_image_scores, score_network, summarise

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def test_per_image_scores_hand_computed():
    label = np.zeros((4, 5), bool)
    label[0, :4] = True  # 4 lesion pixels
    pred = np.zeros((4, 5), bool)
    pred[0, :3] = True  # TP 3
    pred[3, 0] = True  # FP 1; FN 1; TN 20 - 5 = 15
    s = per_image_scores(pred, label)
    assert s["dice"] == pytest.approx(6 / 8)
    assert s["sensitivity"] == pytest.approx(3 / 4)
    assert s["specificity"] == pytest.approx(15 / 16)
    empty = per_image_scores(np.zeros((3, 3)), np.zeros((3, 3)))
    assert empty["dice"] == 1.0 and math.isnan(empty["sensitivity"]) and empty["specificity"] == 1.0


def test_summarise_fold_means_and_sd():
    rows = [
        {"variant": "asegnet", "fold": 0, "image": "a", "dice": 0.6, "sensitivity": 0.5, "specificity": 0.9},
        {"variant": "asegnet", "fold": 0, "image": "b", "dice": 0.8, "sensitivity": float("nan"), "specificity": 1.0},
        {"variant": "asegnet", "fold": 1, "image": "c", "dice": 0.5, "sensitivity": 0.7, "specificity": 0.8},
    ]
    folds, md = summarise(rows, {("asegnet", 0): {"best_epoch": 3, "epochs_run": 5}}, "cmd")
    assert [r["fold"] for r in folds] == [0, 1]
    assert folds[0]["dice"] == pytest.approx(0.7) and folds[0]["sensitivity"] == pytest.approx(0.5)
    assert folds[0]["best_epoch"] == 3 and folds[1]["best_epoch"] == ""
    # mean of the fold means 0.7 and 0.5, sample sd 0.141
    assert "| A-SegNet + focal Tversky | 0.600 ± 0.141 |" in md and "Command: `cmd`" in md


def test_score_network_on_a_real_fold(shared_data):
    """The shipped A-SegNet on fold 0's ten held-out slices at their original size (seen in its training on all 50
    slices, so a floor, not a validation figure); a higher threshold never raises a slice's sensitivity."""
    from data_prep.datalists import make_datalist
    from monai_covid.inference.lesion import load_bundle_network

    net = load_bundle_network(REPO / "bundles" / "covid_ct_lesion_asegnet")
    rows = score_network(net, str(shared_data), fold=0, n_folds=5)
    names = [Path(i["image"]).name for i in make_datalist("ct_lesion_slices", str(shared_data), fold=0, part="val")]
    assert [r["image"] for r in rows] == names and len(rows) == 10
    assert all(0.0 <= r[k] <= 1.0 for r in rows for k in ("dice", "sensitivity", "specificity"))
    assert np.mean([r["dice"] for r in rows]) > 0.6
    strict = score_network(net, str(shared_data), fold=0, n_folds=5, threshold=0.9)
    assert all(s["sensitivity"] <= r["sensitivity"] + 1e-9 for s, r in zip(strict, rows))
    assert all(s["specificity"] >= r["specificity"] - 1e-9 for s, r in zip(strict, rows))


def test_summarise_95ci_over_five_folds():
    """Student t interval over 5 fold means: 0.7 ± 2.776 * 0.0707 / sqrt(5) = 0.612-0.788."""
    rows = [
        {"variant": "unet", "fold": f, "image": "a", "dice": d, "sensitivity": 0.5, "specificity": 0.9}
        for f, d in enumerate([0.6, 0.7, 0.8, 0.7, 0.7])
    ]
    _, md = summarise(rows, {}, "cmd")
    assert "| 0.700 ± 0.071 |" in md and "| 0.612–0.788 |" in md


def test_ci95_of_a_proportion_is_clipped_to_its_range():
    """Specificities of 1.000, 1.000, 0.983, 1.000, 1.000: the t interval (0.987-1.006) ends at 1 for a proportion."""
    from monai_covid.crossval import _ci95

    values = [1.0, 1.0, 0.983, 1.0, 1.0]
    assert _ci95(values) == "0.987–1.006"
    assert _ci95(values, (0.0, 1.0)) == "0.987–1.000"
    assert _ci95([0.01, 0.0, 0.02], (0.0, 1.0)).startswith("0.000–")


def test_a_work_dir_run_of_other_settings_is_never_reused(tmp_path):
    """A finished run is reused only for the same bundle and overrides (``--resume`` aside); a run of another
    bundle's recipe or loss in the same work dir stops the CV with a message naming what differs."""
    from monai_covid.crossval import _run_all, check_same_run

    aseg, cosup = REPO / "bundles" / "covid_ct_lesion_asegnet", REPO / "bundles" / "covid_ct_lesion_cosup_resunet"
    run_dir = tmp_path / "basic_unet" / "fold0"
    run_dir.mkdir(parents=True)
    ov = {"fold": 0, "resume": True, "network_def": {"_target_": "BasicUNet", "spatial_dims": 2}}
    (run_dir / "overrides.json").write_text(
        json.dumps({"bundle_root": str(aseg), "ckpt_dir": str(run_dir), "output_dir": str(run_dir), **ov})
    )
    (run_dir / "train_info.json").write_text("{}")
    check_same_run(aseg, run_dir, {**ov, "resume": False})  # same run, with or without --resume
    _run_all([("basic_unet", run_dir, ov, tmp_path / "log")], aseg, 1)  # reused: nothing is started
    assert not (tmp_path / "log").exists()
    with pytest.raises(SystemExit, match="bundle_root"):
        _run_all([("basic_unet", run_dir, ov, tmp_path / "log")], cosup, 1)
    with pytest.raises(SystemExit, match="loss"):
        check_same_run(aseg, run_dir, {**ov, "loss": {"_target_": "DiceCELoss"}})


def test_learning_curves_from_real_log_lines(tmp_path):
    """learning_curves.png from the StatsHandler lines of the fold logs, with and without a pre-training panel."""
    from PIL import Image

    from monai_covid.crossval import _write_learning_curves

    for f in (0, 1):
        lines = [
            f"2026-12-05 08:07:47,043 - INFO - Epoch[{e}] Metrics -- val_mean_dice: {0.5 + 0.05 * e + 0.01 * f:.4f} "
            "val_sensitivity: 0.7962 val_specificity: 0.8856 " + "\n"
            f"2026-12-05 08:07:47,051 - INFO - Epoch[{e}] Metrics -- train_mean_dice: 0.2825 "
            for e in (1, 2, 3)
        ]
        (tmp_path / f"unet_fold{f}.log").write_text("\n".join(lines) + "\n")
    _write_learning_curves(tmp_path, ["unet"], [0, 1], tmp_path / "one")
    one = Image.open(tmp_path / "one" / "learning_curves.png")
    (tmp_path / "unet_pretrain.log").write_text("x - INFO - Epoch[1] Metrics -- val_mean_dice: 0.3000\n")
    _write_learning_curves(tmp_path, ["unet"], [0, 1], tmp_path / "two", pretrained=True)
    two = Image.open(tmp_path / "two" / "learning_curves.png")
    assert one.width < two.width and one.height == two.height  # one panel, or pre-training beside it
    # the curves are drawn in the variant's colour (matplotlib C0, #1f77b4); an empty plot has none of it
    rgb = np.asarray(one.convert("RGB")).astype(int)
    assert (np.abs(rgb - [31, 119, 180]).sum(axis=-1) < 30).sum() > 200
    (tmp_path / "unet_fold0.log").write_text("no metrics here\n")
    (tmp_path / "unet_fold1.log").write_text("no metrics here\n")
    _write_learning_curves(tmp_path, ["unet"], [0, 1], tmp_path / "empty")
    rgb = np.asarray(Image.open(tmp_path / "empty" / "learning_curves.png").convert("RGB")).astype(int)
    assert (np.abs(rgb - [31, 119, 180]).sum(axis=-1) < 30).sum() == 0


def _disc_case(prob_scale: float, radius: int = 6, size: int = 24):
    """A disc lesion whose probability falls off linearly from the centre: ``prob_scale`` at the centre, so the
    Dice-best threshold depends on how over- or under-confident the "model" is."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    label = r <= radius
    prob = np.clip(prob_scale * (1.0 - r / (2.0 * radius)), 0.0, 1.0).astype(np.float32)
    return prob, label


def test_crossfit_threshold_never_uses_the_folds_own_labels():
    """Folds 0-2 are over-confident (their best cut is high), fold 3 is under-confident (best cut low). Fold 3's
    threshold comes from folds 0-2 only, so it is the high one; changing fold 3's labels cannot move it."""
    from monai_covid.crossval import THRESHOLD_GRID, crossfit_thresholds, mean_dice_by_threshold

    over = [_disc_case(1.6) for _ in range(3)]  # p = 0.8 at the lesion border: Dice-best cut near 0.8
    under = [_disc_case(0.7) for _ in range(3)]  # p = 0.35 at the border
    folds = {k: ([p for p, _ in over], [g for _, g in over]) for k in range(3)}
    folds[3] = ([p for p, _ in under], [g for _, g in under])
    per_fold, overall, curves = crossfit_thresholds(folds)
    best_over = THRESHOLD_GRID[int(np.argmax(mean_dice_by_threshold(*folds[0])))]
    best_under = THRESHOLD_GRID[int(np.argmax(mean_dice_by_threshold(*folds[3])))]
    assert best_over > 0.6 and best_under < 0.4  # the two kinds of fold really want different cuts
    assert per_fold[3] == best_over  # chosen on folds 0-2 alone
    assert per_fold[0] == per_fold[1] == per_fold[2]
    assert set(curves) == {0, 1, 2, 3} and all(len(c) == len(THRESHOLD_GRID) for c in curves.values())
    assert overall in THRESHOLD_GRID
    # fold 3's own labels do not enter its threshold
    blank = {**folds, 3: (folds[3][0], [np.zeros_like(g) for g in folds[3][1]])}
    assert crossfit_thresholds(blank)[0][3] == per_fold[3]


def test_crossfit_threshold_ties_go_to_the_value_nearest_half():
    from monai_covid.crossval import crossfit_thresholds

    label = np.zeros((8, 8), bool)
    label[2:6, 2:6] = True
    prob = np.where(label, 0.95, 0.05).astype(np.float32)  # every grid value gives Dice 1
    per_fold, overall, _ = crossfit_thresholds({0: ([prob], [label]), 1: ([prob], [label])})
    assert per_fold == {0: 0.5, 1: 0.5} and overall == 0.5
    with pytest.raises(ValueError):
        crossfit_thresholds({0: ([prob], [label])})
