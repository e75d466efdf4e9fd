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
    """The shipped recipe on a few real slices (two pseudo-labelled COVID-19 volumes, UCSD and ct_slices_cls
    slices; no DICOM series, to stay fast): 1 pre-training epoch, 30 MIL bags, 5 % threshold, fp16 weights."""
    wf = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"),
        workflow_type="train",
        bundle_root=str(BUNDLE),
        dataset_dir=str(shared_data),
        output_dir=str(tmp_path / "out"),
        ckpt_dir=str(tmp_path / "ckpt"),
        image_size=48,
        sources=["pseudo", "ucsd"],
        source_limit={"pseudo": 110, "ucsd": 24},
        pretrain_epochs=1,
        draws_per_epoch=32,
        mil_steps=30,
    )
    wf.initialize()
    wf.run()
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert 0.0 < summary["slice_threshold"] <= 1.0 and summary["volume_threshold"] == 0.5
    assert summary["train_bag_fp_slice_rate"] <= 0.05  # the threshold rule on training bags
    assert summary["n_train_slices"] == 110 + 24 and len(summary["pretrain_loss"]) == 1
    assert np.isfinite(summary["pretrain_loss"]).all()
    sd = torch.load(tmp_path / "ckpt" / "model.pt", map_location="cpu", weights_only=True)
    assert sd["slice_stem.weight"].dtype == torch.float16 and "lstm.weight_ih_l0" in sd
    wf.finalize()


def test_torchscript_export_and_verify_net_in_out(tmp_path: Path) -> None:
    """The shipped network is scriptable with its weights (monai.bundle ckpt_export) and matches the metadata's
    network_data_format (monai.bundle verify_net_in_out)."""
    from monai.bundle import ckpt_export, verify_net_in_out

    args = dict(meta_file=str(CONFIGS / "metadata.json"), config_file=str(CONFIGS / "inference.json"))
    verify_net_in_out(net_id="network_def", device="cpu", any=3, **args)
    ts = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(BUNDLE / "models" / "model.pt"), **args)
    scripted = torch.jit.load(str(ts))
    x = torch.rand(1, 2, 4, 128, 128)
    with torch.no_grad():
        logits, alpha, scores = scripted.forward_details(x)
        torch.testing.assert_close(scripted(x), logits)
    assert logits.shape == (1, 2) and alpha.shape == scores.shape == (1, 4)


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
