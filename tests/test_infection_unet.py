"""Shapes of the CXR infection U-Net (DenseNet-121 encoder) and of the ResNet comparison encoder."""

from __future__ import annotations

import pytest
import torch

from monai.networks.nets import FlexibleUNet
from monai_covid.networks.infection_unet import PAPER_DENSENET121, InfectionUNet


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "kwargs, size",
    [
        ({}, (64, 96)),
        ({"growth_rate": 8, "init_features": 16, "decoder_channels": (32, 24, 16, 8, 8)}, (70, 50)),  # padded
    ],
)
def test_infection_unet_shapes(kwargs, size):
    net = InfectionUNet(**kwargs).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 1, *size))
    assert out.shape == (2, 1, *size)
    assert torch.isfinite(out).all()


def test_encoder_is_densenet121_layout():
    net = InfectionUNet(growth_rate=12, init_features=24)
    # stem, dense blocks 1-3 (halved by transitions), block 4: 24, 24+6k, (..)/2+12k, (..)/2+24k, (..)/2+16k
    assert net.encoder_channels == (24, 96, 192, 384, 384)
    feats = net.encode(torch.rand(1, 1, 64, 64))
    assert [f.shape[1] for f in feats] == list(net.encoder_channels)
    assert [f.shape[-1] for f in feats] == [32, 16, 8, 4, 2]
    n_dense_layers = sum(1 for n, _ in net.encoder.named_modules() if n.count(".") == 1 and "denselayer" in n)
    assert n_dense_layers == 6 + 12 + 24 + 16


def test_paper_size_encoder_parameters():
    net = InfectionUNet(**PAPER_DENSENET121)
    n_encoder = sum(p.numel() for p in net.encoder.parameters())
    assert 6.8e6 < n_encoder < 7.1e6  # DenseNet-121 without its classifier: ~6.95 M
    assert net.encoder_channels[-1] == 1024
    slim = InfectionUNet()
    assert sum(p.numel() for p in slim.parameters()) * 2 < 6e6  # fp16 weights fit the 6 MB budget


def test_resnet_comparison_encoder_shapes():
    net = FlexibleUNet(1, 1, "resnet10", pretrained=False, decoder_channels=(64, 48, 32, 16, 8)).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 1, 64, 64)


def test_gradients_reach_the_stem():
    net = InfectionUNet(growth_rate=4, init_features=8, decoder_channels=(16, 16, 8, 8, 8))
    net(torch.rand(2, 1, 32, 32)).mean().backward()
    assert net.encoder.conv0.weight.grad is not None and net.encoder.conv0.weight.grad.abs().sum() > 0
