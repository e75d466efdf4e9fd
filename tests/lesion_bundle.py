"""Helpers shared by the CT lesion bundle tests (A-SegNet, Co-supervision ResUnet): real slices, a synthetic CT
in HU and a run of a bundle's ``inference.json``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from monai.bundle import ConfigWorkflow
from tests.bundle_run import run_inference  # noqa: F401  (re-exported for the lesion bundle tests)

SLICES = ("ct_lesion_slices", "train")


def slice_items(shared_data: Path, stems: list[str]) -> list[dict[str, str]]:
    """Datalist items (image jpg, mask png) of the real training slices ``stems``."""
    root = shared_data.joinpath(*SLICES)
    return [{"image": str(root / "images" / f"{s}.jpg"), "label": str(root / "masks" / f"{s}.png")} for s in stems]


def synthetic_ct(n: int = 3, size: int = 630) -> np.ndarray:
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


def train_two_iterations_then_evaluate(bundle: Path, shared_data: Path, tmp_path: Path):
    """``train.json`` for one epoch of 2 iterations (4 real slices, batch 2; validation on 2), then
    ``train.json`` + ``evaluate.json`` on the checkpoint it saved. Asserts what every lesion bundle must do and
    returns the trainer (its state: output of the last iteration, train metrics) for bundle-specific checks."""
    configs = bundle / "configs"
    overrides = {
        "bundle_root": str(bundle),
        "dataset_dir": str(shared_data),
        "ckpt_dir": str(tmp_path / "ckpt"),
        "output_dir": str(tmp_path / "eval"),
        "stage": "supervised",  # these 4 doctor slices alone (Co-sup's default "mixed" also draws pseudo-labels)
        "train_datalist": slice_items(shared_data, ["0", "10", "2", "30"]),
        "val_datalist": slice_items(shared_data, ["52", "16"]),
        "batch_size": 2,
        "max_epochs": 1,
        "device": "$torch.device('cpu')",
    }
    wf = ConfigWorkflow(config_file=str(configs / "train.json"), workflow_type="train", **overrides)
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
        config_file=[str(configs / "train.json"), str(configs / "evaluate.json")], workflow_type="eval", **overrides
    )
    ev.initialize()
    ev.run()
    assert (tmp_path / "eval" / "val_mean_dice_raw.csv").is_file()
    ev.finalize()
    return trainer


def check_slice_inference(bundle: Path, shared_data: Path, tmp_path: Path, stem: str = "10") -> float:
    """``inference.json`` on one real training slice: ``<stem>_seg.png`` of the slice's size, uint8 0/255, nothing
    written into the input folder. Returns the Dice with the radiologist's mask."""
    import shutil

    from PIL import Image

    src = shared_data.joinpath(*SLICES, "images", f"{stem}.jpg")
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(src, inp / src.name)
    run_inference(bundle, inp, tmp_path / "out")
    out = np.asarray(Image.open(tmp_path / "out" / f"{stem}_seg.png"))
    assert out.shape == np.asarray(Image.open(src)).shape and out.dtype == np.uint8
    assert set(np.unique(out)) <= {0, 255}
    assert sorted(p.name for p in inp.iterdir()) == [src.name]
    label = np.asarray(Image.open(shared_data.joinpath(*SLICES, "masks", f"{stem}.png"))) > 127
    pred = out > 0
    return 2 * np.count_nonzero(pred & label) / (np.count_nonzero(pred) + np.count_nonzero(label))


def check_nifti_geometry(bundle: Path, tmp_path: Path, n: int = 3, size: int = 630) -> tuple[np.ndarray, np.ndarray]:
    """``inference.json`` on a synthetic HU volume (:func:`synthetic_ct`) with a non-trivial affine:
    ``<case>_seg.nii.gz`` in the input's exact geometry, values 0/1. Returns (HU, mask) arrays ``(z, y, x)``."""
    import SimpleITK as sitk

    inp = tmp_path / "in"
    inp.mkdir()
    img = sitk.GetImageFromArray(synthetic_ct(n, size).astype(np.int16))
    img.SetSpacing((0.62, 0.62, 5.0))
    img.SetOrigin((-195.3, -210.1, 33.5))
    img.SetDirection((1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(inp / "synthetic_ct.nii.gz"))
    run_inference(bundle, inp, tmp_path / "out")
    seg = sitk.ReadImage(str(tmp_path / "out" / "synthetic_ct_seg.nii.gz"))
    assert seg.GetSize() == img.GetSize() == (size, size, n)
    assert np.allclose(seg.GetSpacing(), img.GetSpacing())
    assert np.allclose(seg.GetOrigin(), img.GetOrigin())
    assert np.allclose(seg.GetDirection(), img.GetDirection())
    arr = sitk.GetArrayFromImage(seg)
    assert set(np.unique(arr)) <= {0, 1}
    return sitk.GetArrayFromImage(img), arr
