"""Residual Attention Network for COVID-19 CT slice classification (COVID CT-Net).

Yazdani, Minaee, Kafieh, Saeedizadeh, Sonka, "COVID CT-Net: Predicting Covid-19 From Chest CT Images Using
Attentional Convolutional Network", arXiv:2009.05096, 2020, Section II-A and Fig. 2/3, which adopts
Wang et al., "Residual Attention Network for Image Classification", CVPR 2017 (the paper's ref. [22]).

Each attention module has

- ``p`` pre-activation residual units before the split,
- a *trunk branch* ``T(x)`` of ``t`` residual units (feature extraction),
- a *soft mask branch* ``M(x)`` in ``[0, 1]``: a bottom-up / top-down fully convolutional network: max pooling
  followed by ``r`` residual units, repeated ``mask_depth`` times (with a residual skip connection between
  corresponding bottom-up and top-down levels), then the same number of linear interpolations back to the input
  size, and finally two 1x1 convolutions and a sigmoid,
- attention residual learning, paper Eq. (2): ``H(x) = (1 + M(x)) * T(x)``,
- ``p`` residual units after the merge.

The paper's setting is ``p = 1, t = 2, r = 1`` (Fig. 2 caption). The network follows Attention-56 (one attention
module per stage, three stages with mask depths 3, 2, 1); the residual units are pre-activation bottlenecks
(BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1) as in ResNet-56's block that the paper names as its basic unit.

Shapes (``spatial_dims=2``, default ``width=16``, input ``N x 1 x 128 x 128``)::

    stem   conv7x7/2 + maxpool/2      N x  16 x 32 x 32
    stage1 unit + attention (depth 3) N x  64 x 32 x 32
    stage2 unit/2 + attention (d 2)   N x 128 x 16 x 16
    stage3 unit/2 + attention (d 1)   N x 256 x  8 x  8
    stage4 unit/2 + 2 units           N x 512 x  4 x  4
    head   BN-ReLU, global avg pool, linear -> N x out_channels (logits; binary: out_channels = 1)

Channels are ``(w, 4w, 8w, 16w, 32w)`` for ``width = w``; ``width=64`` is the paper-size network (Attention-56,
about 30 M parameters), ``width=16`` (default, about 1.9 M parameters, 3.8 MB in fp16) trains on a CPU.
The input size must be divisible by 32 (e.g. 128 or 224) so that the mask branch pools evenly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers.factories import Act, Conv, Norm, Pool

__all__ = ["PreActResidualUnit", "AttentionModule", "ResidualAttentionNet"]


class PreActResidualUnit(nn.Module):
    """Pre-activation bottleneck residual unit: ``x + F(x)`` with ``F`` = 3 x (BN-ReLU-conv), 1x1 / 3x3 / 1x1.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (the bottleneck has ``out_channels // 4``).
        stride: stride of the 3x3 convolution (2 halves the spatial size).

    Input ``N x in_channels x *S``; output ``N x out_channels x *(S / stride)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        norm = Norm[Norm.BATCH, spatial_dims]
        mid = max(out_channels // 4, 1)
        self.bn1, self.conv1 = norm(in_channels), conv(in_channels, mid, 1, bias=False)
        self.bn2, self.conv2 = norm(mid), conv(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn3, self.conv3 = norm(mid), conv(mid, out_channels, 1, bias=False)
        self.act = Act[Act.RELU](inplace=False)
        self.shortcut: nn.Module | None = None
        if in_channels != out_channels or stride != 1:
            self.shortcut = conv(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(pre)
        y = self.conv1(pre)
        y = self.conv2(self.act(self.bn2(y)))
        y = self.conv3(self.act(self.bn3(y)))
        return residual + y


def _units(spatial_dims: int, channels: int, n: int) -> nn.Sequential:
    return nn.Sequential(*[PreActResidualUnit(spatial_dims, channels, channels) for _ in range(n)])


class _MaskLevel(nn.Module):
    """One bottom-up/top-down level of the soft mask branch; returns a map of the input's spatial size."""

    def __init__(self, spatial_dims: int, channels: int, depth: int, r: int) -> None:
        super().__init__()
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=3, stride=2, padding=1)
        self.mode = "bilinear" if spatial_dims == 2 else "trilinear"
        self.inner: _MaskLevel | None = None
        if depth > 1:
            self.down = _units(spatial_dims, channels, r)
            self.skip = PreActResidualUnit(spatial_dims, channels, channels)
            self.inner = _MaskLevel(spatial_dims, channels, depth - 1, r)
            self.up = _units(spatial_dims, channels, r)
        else:  # the lowest resolution: 2r units, as in Wang et al.
            self.down = _units(spatial_dims, channels, 2 * r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(self.pool(x))
        if self.inner is not None:
            y = self.up(self.inner(y) + self.skip(y))
        return F.interpolate(y, size=x.shape[2:], mode=self.mode, align_corners=False)


class AttentionModule(nn.Module):
    """Attention module: trunk ``T``, soft mask ``M`` in ``[0, 1]``, output ``(1 + M) * T`` (paper Eq. 2).

    Args:
        spatial_dims: 2 or 3.
        channels: channels in and out (the module keeps the shape).
        mask_depth: number of max-pooling steps in the mask branch (Attention-56: 3, 2, 1 for stages 1-3).
        p: residual units before the split and after the merge.
        t: residual units in the trunk branch.
        r: residual units between adjacent pooling layers of the mask branch.

    Input and output ``N x channels x *S`` (``S`` divisible by ``2 ** mask_depth``).
    """

    def __init__(self, spatial_dims: int, channels: int, mask_depth: int = 1, p: int = 1, t: int = 2, r: int = 1):
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        norm = Norm[Norm.BATCH, spatial_dims]
        self.pre = _units(spatial_dims, channels, p)
        self.trunk = _units(spatial_dims, channels, t)
        self.mask = nn.Sequential(
            _MaskLevel(spatial_dims, channels, mask_depth, r),
            norm(channels),
            nn.ReLU(),
            conv(channels, channels, 1, bias=False),
            norm(channels),
            nn.ReLU(),
            conv(channels, channels, 1),
            nn.Sigmoid(),
        )
        self.post = _units(spatial_dims, channels, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        return self.post((1.0 + self.mask(x)) * self.trunk(x))


class ResidualAttentionNet(nn.Module):
    """Attention-56 style Residual Attention Network classifier (COVID CT-Net, arXiv:2009.05096 Sec. II-A).

    Args:
        spatial_dims: 2 (CT slices) or 3.
        in_channels: input channels (1 for grayscale CT).
        out_channels: logits; 1 for the binary COVID / non-COVID output (use a sigmoid for the probability).
        width: stem channels ``w``; stage channels are ``(4w, 8w, 16w, 32w)``. 64 = paper size, 16 = default.
        mask_depths: mask-branch pooling depth of the attention modules in stages 1-3.
        modules_per_stage: attention modules per stage (Attention-56: ``(1, 1, 1)``; Attention-92: ``(1, 2, 3)``).
        p, t, r: the paper's hyper-parameters (Fig. 2), default ``p=1, t=2, r=1``.
        dropout: dropout before the final linear layer.

    Input ``N x in_channels x H x W`` (H, W divisible by 32); output ``N x out_channels`` logits.
    The attention modules are ``self.attention1``, ``attention2``, ``attention3``; ``attention3`` is the
    "third attention block" the paper visualises with Grad-CAM (Sec. IV-F).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        width: int = 16,
        mask_depths: Sequence[int] = (3, 2, 1),
        modules_per_stage: Sequence[int] = (1, 1, 1),
        p: int = 1,
        t: int = 2,
        r: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(mask_depths) != 3 or len(modules_per_stage) != 3:
            raise ValueError("mask_depths and modules_per_stage need one entry per attention stage (3)")
        conv = Conv[Conv.CONV, spatial_dims]
        norm = Norm[Norm.BATCH, spatial_dims]
        c = [width, 4 * width, 8 * width, 16 * width, 32 * width]
        self.stem = nn.Sequential(
            conv(in_channels, c[0], 7, stride=2, padding=3, bias=False),
            norm(c[0]),
            nn.ReLU(),
            Pool[Pool.MAX, spatial_dims](kernel_size=3, stride=2, padding=1),
        )

        def stage(i: int) -> tuple[nn.Module, nn.Module]:
            unit = PreActResidualUnit(spatial_dims, c[i], c[i + 1], stride=1 if i == 0 else 2)
            att = nn.Sequential(
                *[AttentionModule(spatial_dims, c[i + 1], mask_depths[i], p, t, r) for _ in range(modules_per_stage[i])]
            )
            return unit, att

        self.unit1, self.attention1 = stage(0)
        self.unit2, self.attention2 = stage(1)
        self.unit3, self.attention3 = stage(2)
        self.unit4 = nn.Sequential(
            PreActResidualUnit(spatial_dims, c[3], c[4], stride=2),
            PreActResidualUnit(spatial_dims, c[4], c[4]),
            PreActResidualUnit(spatial_dims, c[4], c[4]),
        )
        self.head = nn.Sequential(
            norm(c[4]),
            nn.ReLU(),
            Pool[Pool.ADAPTIVEAVG, spatial_dims](1),
            nn.Flatten(1),
            nn.Dropout(dropout),
            nn.Linear(c[4], out_channels),
        )
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.attention1(self.unit1(x))
        x = self.attention2(self.unit2(x))
        x = self.attention3(self.unit3(x))
        return self.head(self.unit4(x))
