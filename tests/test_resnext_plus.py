"""ResNeXt+ network (paper 004): shapes through every block, attention normalisation, ablations, chunked inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_covid.networks.resnext_plus import CBAM, ResNeXtBottleneck, ResNeXtPlus, SliceAttention
from monai_covid.volume_detector import (
    MILLoss,
    binary_metrics,
    lung_crop_box,
    predict_volume,
    predict_volume_details,
    preprocess_volume,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(**kw) -> ResNeXtPlus:
    args = dict(stem_channels=8, channels=(8, 16), layers=(1, 1), cardinality=4, reduction=4, lstm_hidden=8, fc_hidden=16)
    args.update(kw)
    return ResNeXtPlus(**args)


def test_cbam_shapes_and_maps() -> None:
    torch.manual_seed(0)
    cbam = CBAM(16, reduction=4, spatial_kernel=9)
    x = torch.randn(2, 16, 20, 24)
    y = cbam(x)
    assert y.shape == x.shape
    m_c, m_s = cbam.last_channel_map, cbam.last_spatial_map
    assert m_c.shape == (2, 16, 1, 1) and m_s.shape == (2, 1, 20, 24)
    assert 0 < m_c.min() and m_c.max() < 1 and 0 < m_s.min() and m_s.max() < 1  # sigmoid maps (eqs. 8, 10)
    torch.testing.assert_close(y, x * m_c * m_s)  # eqs. 6-7
    assert cbam.spatial.kernel_size == (9, 9)


def test_bottleneck_grouped_and_strided() -> None:
    block = ResNeXtBottleneck(16, 32, width=16, cardinality=4, stride=2)
    assert block.conv2.conv.groups == 4
    assert block(torch.randn(2, 16, 15, 16)).shape == (2, 32, 8, 8)
    with pytest.raises(ValueError):
        ResNeXtBottleneck(16, 32, width=10, cardinality=4)


def test_slice_attention_sums_to_one() -> None:
    att = SliceAttention(12, 6)
    alpha = att(torch.randn(3, 17, 12))
    assert alpha.shape == (3, 17)
    torch.testing.assert_close(alpha.sum(dim=1), torch.ones(3))
    assert (alpha > 0).all()


@pytest.mark.parametrize("use_cbam,use_lung_mask", [(True, True), (False, True), (False, False)])
def test_forward_shapes_and_ablations(use_cbam: bool, use_lung_mask: bool) -> None:
    torch.manual_seed(0)
    net = _tiny(use_cbam=use_cbam, use_lung_mask=use_lung_mask).eval()
    x = torch.rand(2, 2, 5, 64, 64)  # (B, C, N, H, W): channel first, slices along the first spatial axis
    with torch.no_grad():
        logits, alpha, scores = net.forward_details(x)
        feats = net.slice_features(x[0].transpose(0, 1))
        torch.testing.assert_close(net(x), logits)  # forward gives the volume logits only
    assert logits.shape == (2, 2) and alpha.shape == (2, 5) and scores.shape == (2, 5)
    assert feats.shape == (5, net.feature_dim) == (5, 16)
    torch.testing.assert_close(alpha.sum(1), torch.ones(2))
    assert ((scores >= 0) & (scores <= 1)).all()
    assert isinstance(net.cbam, CBAM) == use_cbam
    # without the mask stem the mask channel has no influence; with it, it does
    x2 = x.clone()
    x2[:, 1] = 1 - x2[:, 1]
    with torch.no_grad():
        changed = not torch.allclose(net(x2), logits)
    assert changed == use_lung_mask
    with pytest.raises(ValueError):
        net(x[0])  # a volume without the batch axis is refused


@pytest.mark.parametrize("use_cbam,use_lung_mask", [(True, True), (False, False)])
def test_torchscript_matches_eager(use_cbam: bool, use_lung_mask: bool) -> None:
    torch.manual_seed(0)
    net = _tiny(use_cbam=use_cbam, use_lung_mask=use_lung_mask).eval()
    scripted = torch.jit.script(net)
    x = torch.rand(2, 2 if use_lung_mask else 1, 6, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x))
        for a, b in zip(scripted.forward_details(x), net.forward_details(x)):
            torch.testing.assert_close(a, b)


def test_paper_size_switch() -> None:
    net = ResNeXtPlus.paper()
    assert net.feature_dim == 2048 and net.lstm.hidden_size == 512 and net.head[0].out_features == 1024
    assert net.trunk[0].conv2.conv.groups == 32 and len(net.trunk) == 16  # ResNeXt-50 (3, 4, 6, 3)
    n_slim = sum(p.numel() for p in ResNeXtPlus().parameters())
    assert n_slim * 2 < 6e6  # slim default ships under 6 MB in fp16


def test_frozen_batchnorm_keeps_running_stats() -> None:
    net = _tiny().freeze_batchnorm(True)
    net.train()
    bn = net.stem_norm[0]
    before = bn.running_mean.clone()
    net(torch.rand(1, 2, 4, 32, 32))
    assert not bn.training and torch.equal(before, bn.running_mean)
    assert net.lstm.training  # only BN is frozen


def test_mil_loss_uses_bag_and_known_slice_labels() -> None:
    loss = MILLoss(slice_weight=1.0)
    logits = torch.tensor([[0.0, 2.0]])
    scores = torch.tensor([[0.1, 0.9, 0.2]], requires_grad=True)
    preds = (logits, torch.full((1, 3), 1 / 3), scores)
    unknown = loss(preds, {"label": torch.tensor([1]), "slice_labels": torch.tensor([[-1, -1, -1]])})
    unknown.backward()
    # only the max slice of a positive bag with unknown slice labels gets a gradient
    assert scores.grad[0, 1] != 0 and scores.grad[0, 0] == 0 and scores.grad[0, 2] == 0
    volume_only = torch.nn.functional.cross_entropy(logits, torch.tensor([1]))
    expected = volume_only - torch.log(torch.tensor(0.9))
    torch.testing.assert_close(unknown.detach(), expected)


def test_binary_metrics_values() -> None:
    m = binary_metrics([1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert (m["TP"], m["TN"], m["FP"], m["FN"]) == (2, 1, 1, 1)
    assert m["ACC"] == pytest.approx(0.6) and m["PRE"] == pytest.approx(2 / 3) and m["SEN"] == pytest.approx(2 / 3)
    assert m["SPE"] == pytest.approx(0.5) and m["F1"] == pytest.approx(2 / 3)


def test_preprocess_volume_crop_and_range() -> None:
    hu = np.full((3, 100, 120), 40.0, np.float32)
    lung = np.zeros(hu.shape, bool)
    lung[:, 30:60, 20:90] = True
    hu[lung] = -850.0
    y0, y1, x0, x1 = lung_crop_box(lung)
    assert y1 - y0 == x1 - x0 and y0 <= 30 and y1 >= 60 and x0 <= 20 and x1 >= 90
    x = preprocess_volume(hu, lung, size=32)
    assert x.shape == (3, 2, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= x[:, 0].min() and x[:, 0].max() <= 1.0
    assert set(torch.unique(x[:, 1]).tolist()) == {0.0, 1.0}
    assert x[:, 0][x[:, 1] > 0].mean() < 0.5 < x[:, 0][x[:, 1] == 0].mean()  # lung dark, soft tissue bright


def test_chunked_inference_memory_bounded_300_slices() -> None:
    """A synthetic 300-slice volume: the trunk never sees more than ``chunk_size`` slices at once."""
    torch.manual_seed(0)
    net = _tiny().eval()
    rng = np.random.default_rng(0)
    hu = rng.normal(-800, 100, (300, 96, 96)).astype(np.float32)
    lung = np.zeros(hu.shape, bool)
    lung[:, 20:76, 10:86] = True
    seen: list[int] = []
    orig = net.slice_features

    def spy(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return orig(x)

    net.slice_features = spy  # type: ignore[method-assign]
    d = predict_volume_details(net, hu, lung, size=48, chunk_size=32)
    assert max(seen) <= 32 and sum(seen) == 300
    assert d["slice_scores"].shape == (300,) and d["attention"].shape == (300,)
    assert abs(d["attention"].sum() - 1) < 1e-4 and 0 <= d["covid_probability"] <= 1
    # chunking does not change the result
    net.slice_features = orig  # type: ignore[method-assign]
    p1, s1 = predict_volume(net, hu[:70], lung[:70], size=48, chunk_size=16)
    p2, s2 = predict_volume(net, hu[:70], lung[:70], size=48, chunk_size=70)
    assert p1 == pytest.approx(p2, abs=1e-5)
    np.testing.assert_allclose(s1, s2, atol=1e-5)
