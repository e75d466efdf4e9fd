"""Explanation heatmaps (Grad-CAM, Grad-CAM++, occlusion; paper 002 Sec. IV-F/G) and their overlay geometry."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from monai.transforms import Resize, SpatialPad

from monai_covid.explain import (
    explain_batch,
    minmax_normalize,
    overlay_heatmap,
    read_gray,
    readable_images,
    unletterbox,
)
from monai_covid.networks.residual_attention_net import ResidualAttentionNet


def _letterbox(img: np.ndarray, size: int) -> np.ndarray:
    x = Resize(spatial_size=size, size_mode="longest", mode="area")(img[None].astype(np.float32))
    return np.asarray(SpatialPad([size, size], method="symmetric")(x))[0]


@pytest.mark.parametrize("shape", [(60, 100), (100, 60), (75, 75), (146, 198)])
def test_unletterbox_inverts_resize_and_pad(shape: tuple[int, int]) -> None:
    """A map made on the letterboxed network input lands on the same anatomy of the original image."""
    img = np.zeros(shape, np.float32)
    h, w = shape
    img[h // 4 : h // 2, w // 2 : 3 * w // 4] = 1.0  # an off-centre block
    back = unletterbox(_letterbox(img, 32), shape)
    assert back.shape == shape
    inside = back[img > 0].mean()
    outside = back[img == 0].mean()
    assert inside > 0.6 and outside < 0.15
    assert np.corrcoef(back.ravel(), img.ravel())[0, 1] > 0.8


def test_overlay_and_normalize() -> None:
    img = np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (30, 1))
    hot, cold = overlay_heatmap(img, np.ones((30, 40))), overlay_heatmap(img, np.zeros((30, 40)))
    assert hot.shape == (30, 40, 3) and hot.dtype == np.uint8
    assert hot[..., 0].mean() > cold[..., 0].mean() and cold[..., 2].mean() > hot[..., 2].mean()  # jet: red vs blue
    with pytest.raises(ValueError):
        overlay_heatmap(img, np.zeros((40, 30)))
    x = torch.stack([torch.full((1, 4, 4), 3.0), torch.arange(16.0).reshape(1, 4, 4)])
    n = minmax_normalize(x)
    assert n[0].abs().max() == 0 and n[1].min() == 0 and n[1].max() == 1


def test_readable_images_reports_bad_files(shared_data, tmp_path, capsys) -> None:
    src = sorted((shared_data / "ct_slices_cls" / "covid").glob("*.png"))[:2]
    for p in src:
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "notes.txt").write_text("ignored")
    items = readable_images(tmp_path)
    assert [d["image"] for d in items] == sorted(str(tmp_path / p.name) for p in src)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.png" in err[0]
    gray = read_gray(src[0])
    assert gray.ndim == 2 and gray.dtype == np.uint8 and gray.std() > 0
    with pytest.raises(FileNotFoundError):
        readable_images(tmp_path / "missing")


def test_explain_batch_on_real_slices(shared_data) -> None:
    torch.manual_seed(0)
    paths = [sorted((shared_data / "ct_slices_cls" / c).glob("*.png"))[0] for c in ("covid", "non_covid")]
    x = torch.stack([torch.as_tensor(_letterbox(read_gray(p) / 255.0, 64))[None] for p in paths]).float()
    net = ResidualAttentionNet(width=4).eval()
    maps = explain_batch(net, x, methods=("gradcam", "gradcampp", "occlusion"), occlusion_mask_size=16)
    assert set(maps) == {"gradcam", "gradcampp", "occlusion"}
    for name, m in maps.items():
        assert m.shape == (2, 1, 64, 64), name
        assert m.min() >= 0 and m.max() <= 1, name
    assert maps["gradcam"][0].std() > 0 and maps["gradcampp"][1].std() > 0
    assert not net.training
    with pytest.raises(ValueError):
        explain_batch(net, x, methods=("saliency",))
