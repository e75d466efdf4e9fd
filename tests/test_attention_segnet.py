"""A-SegNet network (paper 000): shapes in/out, attention on/off, the gate formula, paper width."""

from __future__ import annotations

import pytest
import torch

from monai_covid.networks.attention_segnet import PAPER_CHANNELS, PAPER_CONVS, AttentionGate, AttentionSegNet

CASES = [
    # (constructor kwargs, input shape, output shape)
    ({"channels": (4, 8, 16), "convs_per_stage": (2, 2, 2)}, (2, 1, 64, 64), (2, 2, 64, 64)),
    ({"channels": (4, 8, 16), "convs_per_stage": (2, 2, 2), "attention": False}, (2, 1, 64, 48), (2, 2, 64, 48)),
    ({"channels": (8, 16, 32, 64, 128), "convs_per_stage": (2, 2, 2, 2, 2)}, (1, 1, 256, 256), (1, 2, 256, 256)),
    (
        {"channels": (4, 8), "convs_per_stage": (1, 2), "out_channels": 3, "in_channels": 2},
        (1, 2, 32, 16),
        (1, 3, 32, 16),
    ),
    ({"spatial_dims": 3, "channels": (4, 8), "convs_per_stage": (1, 1)}, (1, 1, 16, 16, 8), (1, 2, 16, 16, 8)),
    ({"channels": (4, 8, 16), "convs_per_stage": (2, 2, 2), "norm": "instance"}, (2, 1, 64, 64), (2, 2, 64, 64)),
]


@pytest.mark.parametrize("kwargs,in_shape,out_shape", CASES)
def test_shapes(kwargs, in_shape, out_shape):
    net = AttentionSegNet(**kwargs).eval()
    with torch.no_grad():
        out = net(torch.randn(in_shape))
    assert out.shape == out_shape
    assert torch.isfinite(out).all()
    n_gates = len(kwargs["channels"]) - 1 if kwargs.get("attention", True) else 0
    assert len(net.last_attention) == n_gates
    for a in net.last_attention:
        assert a.shape[1] == 1 and ((a > 0) & (a < 1)).all()


def test_norm_switch_replaces_every_batch_norm():
    """``norm="instance"``: no BatchNorm left (no running statistics), each image normalised on its own, so an
    image's output does not depend on the rest of the batch in training mode; ``"batch"`` keeps the shipped keys."""
    kw = {"channels": (4, 8, 16), "convs_per_stage": (2, 2, 2)}
    inst, bn = AttentionSegNet(norm="instance", **kw), AttentionSegNet(**kw)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in inst.modules())
    assert sum(isinstance(m, torch.nn.InstanceNorm2d) for m in inst.modules()) == sum(
        isinstance(m, torch.nn.BatchNorm2d) for m in bn.modules()
    )
    assert not any("running_mean" in k for k in inst.state_dict())
    x = torch.randn(3, 1, 32, 32)
    inst.train(), bn.train()
    assert torch.allclose(inst(x)[:1], inst(x[:1]), atol=1e-5)
    assert not torch.allclose(bn(x)[:1], bn(x[:1]), atol=1e-5)


def test_plain_segnet_has_no_gates_and_fewer_parameters():
    kw = {"channels": (4, 8, 16), "convs_per_stage": (2, 2, 2)}
    plain, gated = AttentionSegNet(attention=False, **kw), AttentionSegNet(**kw)
    assert len(plain.gates) == 0 and len(gated.gates) == 2
    assert sum(p.numel() for p in plain.parameters()) < sum(p.numel() for p in gated.parameters())


def test_paper_width_forward():
    net = AttentionSegNet(channels=PAPER_CHANNELS, convs_per_stage=PAPER_CONVS).eval()
    # VGG-16 encoder widths; ~15 M parameters encoder + mirrored decoder
    assert 10_000_000 < sum(p.numel() for p in net.parameters()) < 40_000_000
    with torch.no_grad():
        assert net(torch.randn(1, 1, 32, 32)).shape == (1, 2, 32, 32)


def test_indivisible_size_raises():
    net = AttentionSegNet(channels=(4, 8, 16), convs_per_stage=(1, 1, 1))
    with pytest.raises(ValueError, match="divisible by 8"):
        net(torch.randn(1, 1, 60, 64))


def test_gate_matches_formula():
    torch.manual_seed(0)
    gate = AttentionGate(2, x_channels=3, g_channels=5, inter_channels=4)
    x, g = torch.randn(2, 3, 6, 7), torch.randn(2, 5, 6, 7)
    out, alpha = gate(x, g)
    # alpha = sigmoid(psi^T relu(Wx^T x + Wg^T g + b_g) + b_psi), written with einsum over the 1x1 kernels
    wx, wg, wpsi = gate.w_x.weight[:, :, 0, 0], gate.w_g.weight[:, :, 0, 0], gate.psi.weight[:, :, 0, 0]
    q = torch.einsum("ic,bchw->bihw", wx, x) + torch.einsum("ic,bchw->bihw", wg, g) + gate.w_g.bias[None, :, None, None]
    expected = torch.sigmoid(torch.einsum("oi,bihw->bohw", wpsi, torch.relu(q)) + gate.psi.bias[None, :, None, None])
    assert torch.allclose(alpha, expected, atol=1e-6)
    assert torch.allclose(out, x * expected, atol=1e-6)


def test_gradients_reach_the_gates():
    net = AttentionSegNet(channels=(4, 8, 16), convs_per_stage=(1, 1, 1))
    net(torch.randn(2, 1, 32, 32)).sum().backward()
    for gate in net.gates:
        assert gate.psi.weight.grad is not None and gate.psi.weight.grad.abs().sum() > 0
