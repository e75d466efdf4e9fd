"""HU window, tone map and lung mask transforms: asserted values on synthetic and real data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from data_prep.intensity import HUWindow, HUWindowd, ToneMap, ToneMapd
from data_prep.lung import LungMask, LungMaskd, lung_mask, lung_volume_ml


@pytest.mark.parametrize(
    "hu, expected",
    [(-2000.0, 0.0), (-1024.0, 0.0), (-212.0, 0.5), (600.0, 1.0), (3000.0, 1.0)],
)
def test_hu_window_values(hu, expected):
    out = HUWindow()(np.array([hu], dtype=np.float32))
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out[0] == pytest.approx(expected, abs=1e-6)


def test_hu_window_custom_and_types():
    w = HUWindow(-1000, 0)
    t = torch.tensor([[-1000.0, -500.0, 0.0]])
    out = w(t)
    assert isinstance(out, torch.Tensor) and torch.allclose(out, torch.tensor([[0.0, 0.5, 1.0]]))
    d = HUWindowd(keys="img", hu_min=-1000, hu_max=0)({"img": MetaTensor(t), "other": 7})
    assert isinstance(d["img"], MetaTensor) and d["other"] == 7
    with pytest.raises(ValueError):
        HUWindow(0, -10)


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_tone_map_matches_equation_5(scale):
    x = np.array([0.0, 0.1, 0.5, 1.0], dtype=np.float32)
    raw = ToneMap(input_scale=scale, rescale=False)(x)
    expected = 1.0 / (1.0 + np.exp(-0.35 * (x * scale) ** (1.0 / 1.5)))
    np.testing.assert_allclose(raw, expected, rtol=1e-6)
    scaled = ToneMap(input_scale=scale)(x)
    assert scaled[0] == pytest.approx(0.0, abs=1e-6) and scaled[-1] == pytest.approx(1.0, abs=1e-5)
    assert np.all(np.diff(scaled) > 0)  # monotone
    # dark values are expanded (slope > 1), bright ones compressed (slope < 1)
    assert (scaled[1] - scaled[0]) / 0.1 > 1.0 > (scaled[3] - scaled[2]) / 0.5
    t = ToneMapd(keys=["a"], input_scale=scale)({"a": torch.from_numpy(x)})["a"]
    assert isinstance(t, torch.Tensor) and np.allclose(t.numpy(), scaled, atol=1e-6)


def test_tone_map_default_keeps_range_in_use():
    # on [0, 1] input the default curve is close to x^(1/1.5): 0.1 -> ~0.22, not saturated
    assert ToneMap()(np.array([0.1], dtype=np.float32))[0] == pytest.approx(0.1 ** (1 / 1.5), abs=0.02)


def _phantom(shape=(12, 96, 96)):
    """Soft tissue body in air, two lungs (-850 HU) with a vessel and a pleural lesion, air outside."""
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    hu = np.full(shape, -1000.0, dtype=np.float32)
    body = ((y - 48) / 44.0) ** 2 + ((x - 48) / 44.0) ** 2 < 1
    hu[body] = 40.0
    left = ((y - 48) / 26.0) ** 2 + ((x - 28) / 14.0) ** 2 < 1
    right = ((y - 48) / 26.0) ** 2 + ((x - 68) / 14.0) ** 2 < 1
    hu[left | right] = -850.0
    hu[:, 46:50, 26:30] = 30.0  # vessel inside the left lung: a hole to fill
    lesion = right & ((y - 48) ** 2 + (x - 82) ** 2 < 64)  # a bite-shaped consolidation at the lateral pleura
    hu[lesion] = -100.0
    return hu, left | right, lesion


def test_lung_mask_synthetic_phantom():
    hu, lungs, lesion = _phantom()
    m = lung_mask(hu, spacing=(2.0, 1.0, 1.0), dilation_mm=0)
    assert m.dtype == bool and m.shape == hu.shape
    assert not m[hu == -1000.0].any()  # outside air removed
    assert m[:, 47, 27].all()  # vessel hole filled
    # the pleural lesion is recovered by the convex hull (all but the sliver between the chord and the pleura)
    no_hull = lung_mask(hu, spacing=(2.0, 1.0, 1.0), dilation_mm=0, hull_max_ratio=0.0)
    assert no_hull[lesion].mean() < 0.05 and m[lesion].mean() > 0.75
    dice = 2 * (m & lungs).sum() / (m.sum() + lungs.sum())
    assert dice > 0.95
    # the two lungs stay separate (the mediastinum is not filled)
    assert not m[:, 48, 48].any()
    # dilation grows the mask by about the requested radius
    md = lung_mask(hu, spacing=(2.0, 1.0, 1.0), dilation_mm=2.0)
    assert md.sum() > m.sum() and (md | m).sum() == md.sum()


def test_lung_mask_2d_and_transforms():
    hu, _, _ = _phantom((1, 96, 96))
    m2 = lung_mask(hu[0], spacing=(1.0, 1.0))
    assert m2.shape == (96, 96) and m2.any()
    out = LungMask(spacing=(1.0, 1.0))(torch.from_numpy(hu[0][None]))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 96, 96)
    assert torch.equal(out[0].bool(), torch.from_numpy(m2))
    d = LungMaskd(keys="ct", spacing=(1.0, 1.0))({"ct": hu[0][None]})
    assert set(d) == {"ct", "ct_lung"} and d["ct_lung"].shape == (1, 96, 96)
    with pytest.raises(ValueError):
        lung_mask(np.zeros((2, 2, 2, 2)))


def test_lung_mask_real_series(p001_volume, p001_lung):
    v, m = p001_volume, p001_lung
    ml = lung_volume_ml(m, v.spacing)
    assert 2500 < ml < 8000, ml
    # lung voxels are mostly air-like tissue, and the image corners (outside the body) are never lung
    assert np.median(v.array[m]) < -600
    assert not m[:, :20, :20].any()
    # lungs are present in the middle of the chest
    mid = m[m.shape[0] // 2]
    assert mid[:, : mid.shape[1] // 2].sum() > 5000 and mid[:, mid.shape[1] // 2 :].sum() > 5000
