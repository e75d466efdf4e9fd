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

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "covid_ct_lesion_asegnet"
CONFIGS = BUNDLE / "configs"
SLICES = ("ct_lesion_slices", "train")


def _items(shared_data: Path, stems: list[str]) -> list[dict[str, str]]:
    root = shared_data.joinpath(*SLICES)
    return [{"image": str(root / "images" / f"{s}.jpg"), "label": str(root / "masks" / f"{s}.png")} for s in stems]


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
        "train_datalist": _items(shared_data, ["0", "10", "2", "30"]),
        "val_datalist": _items(shared_data, ["52", "16"]),
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


def _run_inference(dataset_dir: Path, output_dir: Path) -> None:
    wf = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        workflow_type="infer",
        bundle_root=str(BUNDLE),
        dataset_dir=str(dataset_dir),
        output_dir=str(output_dir),
        device="$torch.device('cpu')",
    )
    wf.initialize()
    wf.run()
    wf.finalize()


def test_inference_on_real_slice(shared_data, tmp_path):
    src = shared_data.joinpath(*SLICES, "images", "10.jpg")
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(src, inp / "10.jpg")
    _run_inference(inp, tmp_path / "out")
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


def _synthetic_ct(n: int = 3, size: int = 630) -> np.ndarray:
    """(z, y, x) HU: air outside, a soft-tissue body, two lungs at -850 HU, a -300 HU ground-glass blob."""
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) / (0.40 * size)) ** 2 + ((xx - size / 2) / (0.46 * size)) ** 2 < 1
    lungs = np.zeros_like(body)
    for cx in (0.32 * size, 0.68 * size):
        lungs |= ((yy - size / 2) / (0.28 * size)) ** 2 + ((xx - cx) / (0.13 * size)) ** 2 < 1
    blob = (yy - 0.45 * size) ** 2 + (xx - 0.30 * size) ** 2 < (0.06 * size) ** 2
    sl = np.full((size, size), -1000.0, dtype=np.float32)
    sl[body] = 40.0
    sl[lungs] = -850.0
    sl[blob & lungs] = -300.0
    rng = np.random.default_rng(0)
    return np.stack([sl + rng.normal(0, 15, sl.shape).astype(np.float32) for _ in range(n)])


def test_inference_on_synthetic_nifti_preserves_geometry(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    img = sitk.GetImageFromArray(_synthetic_ct().astype(np.int16))
    img.SetSpacing((0.62, 0.62, 5.0))
    img.SetOrigin((-195.3, -210.1, 33.5))
    img.SetDirection((1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(inp / "synthetic_ct.nii.gz"))
    _run_inference(inp, tmp_path / "out")
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
