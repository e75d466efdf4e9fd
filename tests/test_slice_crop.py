"""Lung-box crop of 2D CT slices (data_prep.slice_crop) and heatmaps pasted back into the box (explain.unletterbox)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from data_prep.slice_crop import BOX_KEY, LungCrop, LungCropd, body_box_8bit, lung_box_8bit
from monai_covid.explain import crop_box, unletterbox

REPO = Path(__file__).resolve().parents[1]
CTNET = REPO / "bundles" / "covid_ct_slice_ctnet"


def _ellipse(shape, cy, cx, ry, rx):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _figure(consolidated_right: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 'paper figure': black frame, a body with two dark lungs, off-centre, and a table bar below the body."""
    shape = (300, 400)
    img = np.zeros(shape, np.float32)
    img[_ellipse(shape, 140, 230, 100, 150)] = 170.0  # body
    left, right = _ellipse(shape, 135, 165, 70, 50), _ellipse(shape, 135, 295, 70, 50)
    img[left] = 30.0
    img[right] = 150.0 if consolidated_right else 30.0
    img[250:256, 60:400] = 200.0  # the table, apart from the body
    return img, left, right


def test_lung_box_holds_both_lungs_and_drops_frame_and_table() -> None:
    img, left, right = _figure()
    y0, y1, x0, x1 = lung_box_8bit(img)
    ys, xs = np.nonzero(left | right)
    assert y0 <= ys.min() and y1 > ys.max() and x0 <= xs.min() and x1 > xs.max()
    assert y1 <= 250  # the table is cut off
    assert (y1 - y0) * (x1 - x0) < 0.5 * img.size  # frame and body wall mostly gone
    by0, by1, bx0, bx1 = body_box_8bit(img)
    assert (by0, by1) == (40, 241) and (bx0, bx1) == (80, 381)  # the body ellipse, not the table


def test_one_lung_mask_is_mirrored_about_the_body_centre() -> None:
    img, left, right = _figure(consolidated_right=True)  # the right lung is as bright as tissue: the mask misses it
    y0, y1, x0, x1 = lung_box_8bit(img)
    xs = np.nonzero(right)[1]
    assert x1 > xs.max() - 5 and x0 <= np.nonzero(left)[1].min()


def test_featureless_image_keeps_the_whole_image() -> None:
    assert lung_box_8bit(np.full((64, 80), 100.0)) == (0, 64, 0, 80)


def test_array_and_dict_versions_crop_every_channel_and_record_the_box() -> None:
    img, _, _ = _figure()
    box = lung_box_8bit(img)
    arr = np.stack([img, img]) / 255.0
    out = LungCrop()(arr)
    assert isinstance(out, np.ndarray) and out.shape == (2, box[1] - box[0], box[3] - box[2])
    np.testing.assert_array_equal(out[1], arr[1, box[0] : box[1], box[2] : box[3]])
    raw = LungCrop(scale=1.0)(img[None])  # raw 8-bit values: the same box
    assert raw.shape[1:] == out.shape[1:]
    d = LungCropd(keys="image")({"image": MetaTensor(torch.as_tensor(arr[:1])), "label": 1})
    assert isinstance(d["image"], MetaTensor) and d["label"] == 1
    assert d["image"].meta[BOX_KEY].tolist() == [*box, 300, 400]
    assert crop_box(d["image"]) == list(box)
    assert crop_box(torch.zeros(1, 8, 8)) is None
    with pytest.raises(ValueError, match="channel-first"):
        LungCrop()(img)


def test_unletterbox_pastes_the_heatmap_into_the_box() -> None:
    hm = torch.zeros(64, 64)
    hm[:, 32:] = 1.0  # right half of the (square) crop
    box = (10, 74, 100, 164)  # a 64 x 64 crop of a 120 x 200 image
    full = unletterbox(hm, (120, 200), box)
    assert full.shape == (120, 200)
    assert full[:10].max() == 0 and full[74:].max() == 0 and full[:, :100].max() == 0 and full[:, 164:].max() == 0
    assert full[40, 150] == pytest.approx(1.0) and full[40, 110] == pytest.approx(0.0)
    np.testing.assert_allclose(unletterbox(hm, (64, 64)), unletterbox(hm, (64, 64), (0, 64, 0, 64)))


def test_real_figures_are_cropped_to_their_lungs(shared_data: Path) -> None:
    """On real images the box holds the whole lung mask, and UCSD paper figures (body, table, frame) lose more of
    the image than the SARS-CoV-2 screenshots, which are already cropped close to the lungs."""
    from monai_covid.volume_detector import lung_mask_8bit

    sets = {
        "ucsd": sorted((shared_data / "ct_slices_ucsd" / "val" / "covid").glob("*"))[:4],
        "cls": sorted((shared_data / "ct_slices_cls" / "non_covid").glob("*.png"))[:2],
    }
    kept: dict[str, list[float]] = {}
    for name, files in sets.items():
        for p in files:
            with Image.open(p) as im:
                a = np.asarray(im.convert("L"), dtype=np.float32)
            y0, y1, x0, x1 = lung_box_8bit(a)
            assert 0 <= y0 < y1 <= a.shape[0] and 0 <= x0 < x1 <= a.shape[1]
            mask = lung_mask_8bit(a)
            assert mask[y0:y1, x0:x1].sum() >= 0.99 * mask.sum(), p.name
            kept.setdefault(name, []).append((y1 - y0) * (x1 - x0) / a.size)
    assert min(kept["cls"]) >= 0.9  # measured 0.93 and 1.00
    assert np.median(kept["ucsd"]) < 0.85 and min(kept["ucsd"]) >= 0.2  # measured 0.62-0.87


def test_inference_with_lung_crop_maps_heatmaps_back_to_the_box(shared_data: Path, tmp_path: Path) -> None:
    """The bundle's own inference path with ``lung_crop`` on: the probability is computed on the crop and the
    Grad-CAM map lies inside the crop box of the original image."""
    from monai_covid.explain import SliceClassifier

    bundle = tmp_path / "ctnet"
    shutil.copytree(CTNET / "configs", bundle / "configs")
    shutil.copytree(CTNET / "models", bundle / "models")
    cfg = json.loads((bundle / "configs" / "inference.json").read_text())
    cfg["lung_crop"] = True
    (bundle / "configs" / "inference.json").write_text(json.dumps(cfg))
    ucsd_non_covid = sorted((shared_data / "ct_slices_ucsd" / "val" / "non_covid").glob("*"))
    image = max(ucsd_non_covid, key=lambda p: p.stat().st_size)
    clf = SliceClassifier(bundle)
    pre = clf.preprocessing({"image": str(image)})["image"]
    box = crop_box(pre)
    assert box is not None and tuple(pre.shape) == (1, 128, 128)
    out = clf(image)
    assert 0.0 <= out["covid_probability"] <= 1.0
    with Image.open(image) as im:
        w, h = im.size
    assert out["overlays"]["gradcam"].shape == (h, w, 3)
    assert box[1] - box[0] <= h and box[3] - box[2] <= w and (box[1] - box[0]) * (box[3] - box[2]) < h * w
