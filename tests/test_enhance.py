"""Stochastic random-walk enhancement (paper 004, Section III-A1)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image
from scipy import ndimage

from data_prep.enhance import StochasticEnhance, StochasticEnhanced, stochastic_layers, structure_tensor_coherence


def _noisy_step(seed: int = 1, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((size, size), 0.3, np.float32)
    img[:, size // 2 :] = 0.7
    return np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1).astype(np.float32)


@pytest.mark.parametrize("value", [0.0, 0.42, 1.0])
def test_constant_image_stays_constant(value: float) -> None:
    img = np.full((40, 48), value, np.float32)
    out = StochasticEnhance(n_samples=20)(img)
    np.testing.assert_allclose(out, value, atol=1e-6)


def test_structure_tensor_coherence_marks_edges() -> None:
    img = np.zeros((32, 32), np.float32)
    img[:, 16:] = 1.0
    coh = structure_tensor_coherence(img)
    assert coh[:, 15:17].min() > 0.3  # on the edge
    assert coh[:, :8].max() < 1e-6  # flat region


def test_seed_determinism() -> None:
    img = _noisy_step(size=48)
    a = StochasticEnhance(n_samples=30, seed=3)(img)
    b = StochasticEnhance(n_samples=30, seed=3)(img)
    c = StochasticEnhance(n_samples=30, seed=4)(img)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4


def test_output_range_and_types() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((3, 32, 40)).astype(np.float32)  # channel-first
    out = StochasticEnhance(n_samples=15)(img)
    assert isinstance(out, np.ndarray) and out.shape == img.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    t = torch.from_numpy(img[0]).double()
    out_t = StochasticEnhance(n_samples=15)(t)
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float64 and out_t.shape == t.shape
    np.testing.assert_allclose(out_t.numpy(), out[0], atol=1e-6)  # channels use the same walks
    mt = StochasticEnhance(n_samples=15)(MetaTensor(torch.from_numpy(img[:1])))
    assert isinstance(mt, MetaTensor) and mt.shape == (1, 32, 40)
    raw = StochasticEnhance(n_samples=15, clip=None, k=4.0)(img[0])
    assert raw.max() > 1.0 or raw.min() < 0.0  # clip=None keeps the raw values


def test_base_layer_preserves_edge_better_than_blur() -> None:
    noisy = _noisy_step()
    base, d1, d2 = stochastic_layers(noisy, n_samples=100, seed=0)
    blur = ndimage.gaussian_filter(noisy, 2.0)
    # both smooth the flat region about equally (noise std 0.03 -> < 0.01) ...
    assert base[:, 5:25].std() < 0.01 and blur[:, 5:25].std() < 0.01
    # ... but the random walks do not cross the edge: the step stays sharp
    step_base = np.abs(np.diff(base, axis=1))[:, 30:34].max(axis=1).mean()
    step_blur = np.abs(np.diff(blur, axis=1))[:, 30:34].max(axis=1).mean()
    assert step_base > 0.3 and step_base > 3 * step_blur
    np.testing.assert_allclose(d2, noisy - base, atol=1e-6)
    assert -0.5 <= d1.min() and d1.max() <= 0.5


def test_enhancement_raises_edge_contrast() -> None:
    noisy = _noisy_step()
    enh = StochasticEnhance(n_samples=100)(noisy)
    assert enh[:, 32:].mean() - enh[:, :32].mean() > noisy[:, 32:].mean() - noisy[:, :32].mean()


def test_dict_version(shared_data) -> None:
    path = sorted((shared_data / "ct_slices_cls" / "covid").glob("*.png"))[0]
    img = np.asarray(Image.open(path).convert("L").resize((96, 96)), np.float32)[None] / 255.0
    d = StochasticEnhanced(keys=["image", "absent"], n_samples=20, allow_missing_keys=True)({"image": img, "label": 1})
    assert d["label"] == 1 and d["image"].shape == (1, 96, 96)
    np.testing.assert_array_equal(d["image"], StochasticEnhance(n_samples=20)(img))
    assert 0.0 <= d["image"].min() and d["image"].max() <= 1.0 and np.abs(d["image"] - img).mean() > 0.005
    with pytest.raises(KeyError):
        StochasticEnhanced(keys=["absent"])({"image": img})


def test_paper_settings_are_fast_enough() -> None:
    img = np.random.default_rng(0).random((224, 224)).astype(np.float32)
    t0 = time.perf_counter()
    out = StochasticEnhance()(img)  # n=20, M=250 as in the paper
    elapsed = time.perf_counter() - t0
    assert out.shape == (224, 224)
    assert elapsed < 10.0, f"224x224 slice took {elapsed:.1f} s"
