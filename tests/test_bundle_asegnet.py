"""Bundle covid_ct_lesion_asegnet: metadata, network in/out, train/evaluate/inference configs on real slices."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from monai.bundle import ConfigWorkflow, verify_net_in_out

from tests.lesion_bundle import SLICES, run_inference, slice_items, synthetic_ct

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "covid_ct_lesion_asegnet"
CONFIGS = BUNDLE / "configs"


def test_verify_net_in_out():
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=str(CONFIGS / "inference.json"),
        bundle_root=str(BUNDLE),
        n=1,
        any_type=True,
    )


def test_shipped_weights_are_fp16_and_load(tmp_path):
    from monai_covid.inference.lesion import load_bundle_network

    state = torch.load(BUNDLE / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if torch.is_floating_point(v))
    net = load_bundle_network(BUNDLE)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert not net.training


def test_train_two_iterations_then_evaluate(shared_data, tmp_path):
    overrides = {
        "bundle_root": str(BUNDLE),
        "dataset_dir": str(shared_data),
        "ckpt_dir": str(tmp_path / "ckpt"),
        "output_dir": str(tmp_path / "eval"),
        "train_datalist": slice_items(shared_data, ["0", "10", "2", "30"]),
        "val_datalist": slice_items(shared_data, ["52", "16"]),
        "batch_size": 2,
        "max_epochs": 1,
        "device": "$torch.device('cpu')",
    }
    wf = ConfigWorkflow(config_file=str(CONFIGS / "train.json"), workflow_type="train", **overrides)
    wf.initialize()
    wf.run()
    trainer = wf.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 2
    assert np.isfinite(float(trainer.state.output[0]["loss"]))
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    assert 0.0 <= evaluator.state.metrics["val_mean_dice"] <= 1.0
    assert (tmp_path / "ckpt" / "model.pt").is_file()
    wf.finalize()

    ev = ConfigWorkflow(
        config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")], workflow_type="eval", **overrides
    )
    ev.initialize()
    ev.run()
    assert (tmp_path / "eval" / "val_mean_dice_raw.csv").is_file()
    ev.finalize()


def test_inference_on_real_slice(shared_data, tmp_path):
    src = shared_data.joinpath(*SLICES, "images", "10.jpg")
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(src, inp / "10.jpg")
    run_inference(BUNDLE, inp, tmp_path / "out")
    out = np.asarray(Image.open(tmp_path / "out" / "10_seg.png"))
    image = np.asarray(Image.open(src))
    assert out.shape == image.shape and out.dtype == np.uint8
    assert set(np.unique(out)) <= {0, 255}
    # a training slice of the shipped model: the mask must overlap the radiologist's lesion mask substantially
    label = np.asarray(Image.open(shared_data.joinpath(*SLICES, "masks", "10.png"))) > 127
    pred = out > 0
    dice = 2 * np.count_nonzero(pred & label) / (np.count_nonzero(pred) + np.count_nonzero(label))
    assert dice > 0.4
    assert sorted(p.name for p in inp.iterdir()) == ["10.jpg"]  # nothing written into the input folder


def test_inference_on_synthetic_nifti_preserves_geometry(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    img = sitk.GetImageFromArray(synthetic_ct().astype(np.int16))
    img.SetSpacing((0.62, 0.62, 5.0))
    img.SetOrigin((-195.3, -210.1, 33.5))
    img.SetDirection((1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(inp / "synthetic_ct.nii.gz"))
    run_inference(BUNDLE, inp, tmp_path / "out")
    seg = sitk.ReadImage(str(tmp_path / "out" / "synthetic_ct_seg.nii.gz"))
    assert seg.GetSize() == img.GetSize() == (630, 630, 3)
    assert np.allclose(seg.GetSpacing(), img.GetSpacing())
    assert np.allclose(seg.GetOrigin(), img.GetOrigin())
    assert np.allclose(seg.GetDirection(), img.GetDirection())
    arr = sitk.GetArrayFromImage(seg)
    assert set(np.unique(arr)) <= {0, 1}
    # nothing outside the lungs: the body wall and the air around it stay background
    hu = sitk.GetArrayFromImage(img)
    assert not arr[hu > -500].any() or arr[hu > 0].sum() == 0
    assert arr[:, :, :40].sum() == 0 and arr[:, :40, :].sum() == 0


def test_bad_inputs_give_clear_errors(tmp_path):
    from monai_covid.inference.lesion import list_inputs, load_case

    with pytest.raises(FileNotFoundError, match="no png/jpg slices"):
        list_inputs(tmp_path)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_case({"image": str(bad), "kind": "image", "name": "broken"})
