"""ResidualAttentionNet (COVID CT-Net, arXiv:2009.05096 Sec. II-A): shapes, the (1 + M) * T identity, sizes."""

from __future__ import annotations

import pytest
import torch

from monai_covid.networks.residual_attention_net import AttentionModule, PreActResidualUnit, ResidualAttentionNet


class _ConstantMask(torch.nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand_as(x)


@pytest.mark.parametrize(
    "spatial_dims, size, out_channels", [(2, 128, 1), (2, 224, 1), (2, 64, 2), (3, 32, 1)]
)
def test_forward_shapes(spatial_dims: int, size: int, out_channels: int) -> None:
    net = ResidualAttentionNet(spatial_dims=spatial_dims, in_channels=1, out_channels=out_channels, width=4).eval()
    x = torch.randn(2, 1, *([size] * spatial_dims))
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, out_channels)
    assert torch.isfinite(y).all()


def test_stage_shapes_documented() -> None:
    """The docstring's table: stage outputs for a 1 x 128 x 128 input with width 16."""
    net = ResidualAttentionNet(width=16).eval()
    shapes = {}
    for name in ("stem", "attention1", "attention2", "attention3", "unit4"):
        getattr(net, name).register_forward_hook(lambda m, i, o, n=name: shapes.__setitem__(n, tuple(o.shape)))
    with torch.no_grad():
        net(torch.randn(1, 1, 128, 128))
    assert shapes == {
        "stem": (1, 16, 32, 32),
        "attention1": (1, 64, 32, 32),
        "attention2": (1, 128, 16, 16),
        "attention3": (1, 256, 8, 8),
        "unit4": (1, 512, 4, 4),
    }


@pytest.mark.parametrize("mask_depth", [1, 2, 3])
def test_attention_residual_learning_identity(mask_depth: int) -> None:
    """Paper Eq. (2): H = (1 + M) * T, checked with the mask branch forced to a known map."""
    torch.manual_seed(0)
    module = AttentionModule(2, 8, mask_depth=mask_depth, p=1, t=2, r=1).eval()
    module.pre = torch.nn.Identity()
    module.post = torch.nn.Identity()
    x = torch.randn(2, 8, 16, 16)
    forced = torch.rand(1, 8, 16, 16)
    with torch.no_grad():
        trunk = module.trunk(x)
        real_mask = module.mask(x)
        module.mask = _ConstantMask(forced)
        out = module(x)
        torch.testing.assert_close(out, (1 + forced) * trunk)
        module.mask = _ConstantMask(torch.zeros(1))  # M = 0 gives back the trunk features F(x)
        torch.testing.assert_close(module(x), trunk)
    assert real_mask.shape == x.shape
    assert real_mask.min() >= 0 and real_mask.max() <= 1  # sigmoid mask in [0, 1]
    assert real_mask.std() > 0


def test_paper_hyper_parameters_unit_counts() -> None:
    """p = 1, t = 2, r = 1: one unit before/after, two in the trunk, r per mask level (2r at the bottom)."""
    m = AttentionModule(2, 8, mask_depth=3, p=1, t=2, r=1)
    assert len(m.pre) == 1 and len(m.post) == 1 and len(m.trunk) == 2
    level, depth = m.mask[0], 0
    while level is not None:
        depth += 1
        assert len(level.down) == (1 if level.inner is not None else 2)
        level = level.inner
    assert depth == 3
    assert sum(isinstance(x, PreActResidualUnit) for x in m.modules()) == 1 + 2 + 1 + (1 + 1 + 1) * 2 + 2


def test_sizes_default_and_paper() -> None:
    slim = sum(p.numel() for p in ResidualAttentionNet().parameters())
    paper = sum(p.numel() for p in ResidualAttentionNet(width=64).parameters())
    assert slim * 2 <= 5 * 1024**2  # <= 5 MB as fp16
    assert 25e6 < paper < 35e6  # Attention-56 is about 31.9 M parameters (with a 1000-class head)


def test_gradients_reach_mask_branch() -> None:
    net = ResidualAttentionNet(width=4)
    loss = net(torch.randn(2, 1, 64, 64)).sum()
    loss.backward()
    grad = net.attention1[0].mask[0].down[0].conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0
