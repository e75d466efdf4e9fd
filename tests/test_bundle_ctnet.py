"""Bundle covid_ct_slice_ctnet (COVID CT-Net, paper 002): metadata, a short real training run, evaluation and
inference with heatmaps on real CT slices, all through monai.bundle's ConfigWorkflow."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from PIL import Image

from data_prep.datalists import ct_slices_cls_datalist, split_by_fold
from tests.bundle_run import run_inference

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "covid_ct_slice_ctnet"
CONFIGS = BUNDLE / "configs"


def _subset(shared_data: Path, fold: int, part: int, n_per_class: int) -> list[dict]:
    """``n_per_class`` COVID and non-COVID items of the training (part 0) or validation (part 1) side of ``fold``."""
    items = split_by_fold(ct_slices_cls_datalist(shared_data), fold)[part]
    return [d for d in items if d["label"] == 1][:n_per_class] + [d for d in items if d["label"] == 0][:n_per_class]


def test_inference_config_reads_top_to_bottom() -> None:
    keys = list(json.loads((CONFIGS / "inference.json").read_text()))
    order = ["bundle_root", "output_dir", "dataset_dir", "datalist", "device", "network_def", "preprocessing",
             "dataset", "dataloader", "inferer", "postprocessing", "handlers", "evaluator", "initialize", "run"]
    assert [k for k in keys if k in order] == order


def test_short_training_and_evaluation(shared_data: Path, tmp_path: Path) -> None:
    """2 training iterations (4 real slices, batch 2) then the evaluate config on 4 held-out slices."""
    common = dict(
        bundle_root=str(BUNDLE),
        dataset_dir=str(shared_data),
        output_dir=str(tmp_path / "out"),
        ckpt_dir=str(tmp_path / "ckpt"),
        image_size=64,
        width=4,
        train_datalist=_subset(shared_data, 0, 0, 2),
        val_datalist=_subset(shared_data, 0, 1, 2),
        batch_size=2,
    )
    wf = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"), workflow_type="train", epochs=1, augment_factor=1, **common
    )
    wf.initialize()
    wf.run()
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.epoch == 1 and trainer.state.iteration == 2
    assert np.isfinite(float(trainer.state.output[0]["loss"]))
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    assert 0.0 <= evaluator.state.metrics["val_auc"] <= 1.0
    sd = torch.load(tmp_path / "ckpt" / "model.pt", map_location="cpu", weights_only=True)
    assert sd["stem.0.weight"].dtype == torch.float16 and sd["stem.0.weight"].shape[0] == 4
    wf.finalize()

    ev = ConfigWorkflow(
        config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")],
        workflow_type=None,
        eval_output_dir=str(tmp_path / "eval"),
        **common,
    )
    ev.initialize()
    ev.run()
    with open(tmp_path / "eval" / "threshold_sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["threshold"]) for r in rows] == pytest.approx([0.1 * k for k in range(1, 10)])
    assert all(int(r["tp"]) + int(r["fn"]) == 2 and int(r["tn"]) + int(r["fp"]) == 2 for r in rows)
    for name in ("roc_curve.png", "pr_curve.png", "confusion_matrix.png", "summary.json", "scores.csv"):
        assert (tmp_path / "eval" / name).is_file(), name
    ev.finalize()


def test_inference_with_heatmaps(shared_data: Path, tmp_path: Path, capsys) -> None:
    """Shipped weights on 4 real slices plus one broken file: one error line, predictions and heatmaps for the rest."""
    items = _subset(shared_data, 0, 1, 2)
    data = tmp_path / "in"
    data.mkdir()
    for d in items:
        shutil.copy(d["image"], data / Path(d["image"]).name)
    (data / "broken.png").write_bytes(b"\x89PNG truncated")
    out = tmp_path / "out"
    # 7 x 7 occlusion patch positions instead of 15 x 15: same code path, faster test
    run_inference(BUNDLE, data, out, explain_occlusion=True, occlusion_mask_size=32)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "broken.png" in err[0]
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "covid_probability", "label"]
    truth = {Path(d["image"]).name: d["label"] for d in items}
    assert sorted(Path(r["image"]).name for r in rows) == sorted(truth)
    prob = {Path(r["image"]).name: float(r["covid_probability"]) for r in rows}
    assert all(0.0 <= p <= 1.0 for p in prob.values())
    cfg = json.loads((CONFIGS / "inference.json").read_text())
    assert all(int(r["label"]) == int(float(r["covid_probability"]) >= cfg["threshold"]) for r in rows)
    # covid_probability is the calibrated one: sigmoid(a * logit + b) with the config's Platt parameters
    from monai_covid.explain import SliceClassifier

    clf = SliceClassifier(BUNDLE)
    a, b = cfg["calibration"]
    for name in truth:
        res = clf(data / name)
        assert prob[name] == pytest.approx(res["covid_probability"], abs=1e-4)
        assert res["covid_probability"] == pytest.approx(float(torch.sigmoid(torch.tensor(a * res["logit"] + b))), abs=1e-6)
    for name in truth:
        stem = Path(name).stem
        with Image.open(data / name) as im:
            size = im.size
        for method in ("gradcam", "gradcampp", "occlusion"):
            png = out / f"{stem}_{method}.png"
            with Image.open(png) as hm:
                assert hm.size == size, png
                arr = np.asarray(hm.convert("RGB"), dtype=np.float32)
            assert arr.std() > 0
            # the overlay is not just the grayscale image: colour channels differ where the heatmap is
            assert np.abs(arr[..., 0] - arr[..., 2]).mean() > 1.0
    assert not list(data.glob("*_gradcam.png"))  # nothing written into the input folder


def _ucsd_mixed_formats(shared_data: Path) -> list[Path]:
    """One UCSD COVID-CT image of each stored kind: RGB jpg, gray jpg, gray png, RGBA png."""
    wanted = {("jpg", "RGB"), ("jpg", "L"), ("png", "L"), ("png", "RGBA")}
    picked: dict[tuple[str, str], Path] = {}
    for p in sorted((shared_data / "ct_slices_ucsd" / "val").glob("*/*.*")):
        with Image.open(p) as im:
            kind = (p.suffix.lower().lstrip("."), im.mode)
        if kind in wanted and kind not in picked:
            picked[kind] = p
    assert set(picked) == wanted
    return list(picked.values())


def test_inference_reads_jpg_and_png_rgb_or_gray(shared_data: Path, tmp_path: Path) -> None:
    """inference.json on real UCSD COVID-CT figures (jpg and png, RGB, RGBA and gray): a calibrated probability and
    Grad-CAM / Grad-CAM++ overlays at each image's own size."""
    files = _ucsd_mixed_formats(shared_data)
    data = tmp_path / "in"
    data.mkdir()
    for p in files:
        shutil.copy(p, data / p.name)
    out = tmp_path / "out"
    run_inference(BUNDLE, data, out)
    with open(out / "predictions.csv") as f:
        rows = {Path(r["image"]).name: r for r in csv.DictReader(f)}
    assert sorted(rows) == sorted(p.name for p in files)
    cfg = json.loads((CONFIGS / "inference.json").read_text())
    for p in files:
        prob = float(rows[p.name]["covid_probability"])
        assert 0.0 <= prob <= 1.0 and int(rows[p.name]["label"]) == int(prob >= cfg["threshold"])
        with Image.open(p) as im:
            size = im.size
        for method in ("gradcam", "gradcampp"):
            with Image.open(out / f"{p.stem}_{method}.png") as hm:
                assert hm.size == size and hm.mode == "RGB"


def test_batch_infer_modality_ct_runs_ctnet_on_jpg_and_png(shared_data: Path, tmp_path: Path) -> None:
    """``monai-covid infer --modality ct --models ctnet``: CT-Net probability and heatmaps per 2D image, the same
    probability as the bundle's inference.json, a broken jpg reported and the batch going on."""
    from monai_covid.cli import main
    from monai_covid.explain import SliceClassifier

    files = _ucsd_mixed_formats(shared_data)[:2]  # RGB jpg and gray jpg
    files.append(sorted((shared_data / "ct_slices_cls" / "covid").glob("*.png"))[0])  # RGBA png of the other source
    inp = tmp_path / "in"
    inp.mkdir()
    for p in files:
        shutil.copy(p, inp / p.name)
    (inp / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    before = sorted(q.name for q in inp.iterdir())
    rc = main(["infer", str(inp), str(tmp_path / "out"), "--modality", "ct", "--models", "ctnet", "--quiet"])
    assert rc == 1  # the broken file fails, the others complete
    assert sorted(q.name for q in inp.iterdir()) == before
    with open(tmp_path / "out" / "report.csv") as f:
        report = list(csv.DictReader(f))
    assert len(report) == 4
    ok = [r for r in report if r["status"] == "ok"]
    failed = [r for r in report if r["status"] == "failed"]
    assert len(ok) == 3 and len(failed) == 1 and "broken" in failed[0]["source"]
    clf = SliceClassifier(BUNDLE)
    for r in ok:
        case = tmp_path / "out" / r["case_id"]
        result = json.loads((case / "result.json").read_text())
        src = next(p for p in files if p.name in r["source"])
        assert float(r["covid_probability"]) == pytest.approx(clf(src)["covid_probability"], abs=1e-3)
        with Image.open(src) as im:
            size = im.size
        for method in ("gradcam", "gradcampp"):
            assert result["outputs"][method] == f"{method}.png"
            with Image.open(case / f"{method}.png") as hm:
                assert hm.size == size
