"""Bundle covid_ct_volume_resnextplus: metadata, a short real training run and inference on the real P001 series,
both through monai.bundle's ConfigWorkflow."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import torch
from monai.bundle import ConfigWorkflow

from tests.bundle_run import run_inference

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "covid_ct_volume_resnextplus"
CONFIGS = BUNDLE / "configs"


def test_thresholds_in_inference_config() -> None:
    # thresholds chosen on validation are stored in the inference config
    inf = json.loads((CONFIGS / "inference.json").read_text())
    assert 0.0 < inf["postprocessing"]["slice_threshold"] < 1.0


def test_short_training_run(shared_data: Path, tmp_path: Path) -> None:
    """2D labelled slices only (no DICOM series, to stay fast): 1 pretrain epoch + 2 MIL epochs of 2 bags."""
    wf = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"),
        workflow_type="train",
        bundle_root=str(BUNDLE),
        dataset_dir=str(shared_data),
        output_dir=str(tmp_path / "out"),
        ckpt_dir=str(tmp_path / "ckpt"),
        image_size=64,
        max_train_slices=12,
        max_val_slices=8,
        train_series_ids=[],
        pretrain_epochs=1,
        epochs=2,
        bags_per_epoch=2,
        max_slices=6,
        val_bags=2,
    )
    wf.initialize()
    wf.run()
    trainer = wf.parser.get_parsed_content("trainer")
    assert trainer.state.epoch == 2 and trainer.state.iteration == 4
    assert np.isfinite(float(trainer.state.output[0]["loss"]))
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert 0.0 < summary["slice_threshold"] < 1.0 and summary["n_val_bags"] == 2
    sd = torch.load(tmp_path / "ckpt" / "model.pt", map_location="cpu", weights_only=True)
    assert sd["slice_stem.weight"].dtype == torch.float16
    # batch norm is frozen for the MIL stage (paper: BN running estimates disabled)
    assert not wf.parser.get_parsed_content("network").stem_norm[0].training
    wf.finalize()


def test_inference_on_real_p001(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "ct_dicom" / "P001"
    data = tmp_path / "in" / "P001"
    data.mkdir(parents=True)
    for f in src.glob("*.dcm"):  # links, so nothing is ever written next to the shared data
        (data / f.name).symlink_to(f)
    out = tmp_path / "out"
    run_inference(BUNDLE, tmp_path / "in", out)
    with open(out / "predictions.csv", newline="") as f:
        preds = list(csv.DictReader(f))
    assert [p["case"] for p in preds] == ["P001"]
    assert 0.0 <= float(preds[0]["covid_probability"]) <= 1.0 and preds[0]["label"] in ("0", "1")
    with open(out / "P001_slices.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    dicom_instances = sorted(int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in src.glob("*.dcm"))
    assert len(rows) == len(dicom_instances) == 148
    assert [int(r["slice_index"]) for r in rows] == list(range(148))
    assert sorted(int(r["instance_number"]) for r in rows) == dicom_instances
    scores = np.array([float(r["slice_score"]) for r in rows])
    assert ((scores >= 0) & (scores <= 1)).all()
    thr = json.loads((CONFIGS / "inference.json").read_text())["postprocessing"]["slice_threshold"]
    clear = np.abs(scores - thr) > 1e-4  # the CSV rounds scores to 4 decimals; calls were made before rounding
    calls = np.array([int(r["slice_covid"]) for r in rows])
    assert (calls[clear] == (scores[clear] >= thr)).all()
    png = out / "P001_slices.png"
    assert png.is_file() and 5_000 < png.stat().st_size < 300_000
    assert not any(p.is_file() and not p.is_symlink() for p in data.iterdir())  # nothing written into the input
