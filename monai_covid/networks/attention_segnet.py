"""A-SegNet: SegNet with additive attention gates on the skip connections.

Budak, Ü., Çıbuk, M., Cömert, Z., Şengür, A. "Efficient COVID-19 Segmentation from CT Slices Exploiting Semantic
Segmentation with Integrated Attention Mechanism", J Digit Imaging (2021), doi:10.1007/s10278-021-00434-5,
section "Attention-Based Network Architecture (A-SegNet)" and "Attention Gate Module" (Figs. 1 and 2).

SegNet (Badrinarayanan et al., TPAMI 2017) is a VGG-style encoder (conv-BN-ReLU blocks, each followed by a 2x2
max-pooling whose argmax indices are kept) and a mirrored decoder that upsamples with max-unpooling at those indices.
A-SegNet adds, at every skip connection, an additive attention gate (Oktay et al. 2018, the paper's Eq. 2)::

    alpha_i = sigmoid(psi^T(relu(W_x^T x_i + W_g^T g_i + b_g)) + b_psi),     AG_out = alpha_i * x_i

``x_i`` is the pooled encoder output that the paper sends "to both the next encoder and the corresponding decoder";
``g_i`` is the output of the previous (coarser) decoder, at the same resolution as ``x_i``. The gated features are
concatenated with ``g_i``, fused by a 1x1 conv-BN-ReLU back to the width of the unpooling indices, and fed into the
next decoder. With ``attention=False`` there are no skip features at all: the network is plain SegNet (the paper's
baseline).

The paper's text calls the chosen gate "multiplicative" but writes the additive formula; the formula is implemented.

Shapes: input ``(B, in_channels, H, W[, D])`` with every spatial size divisible by ``2 ** len(channels)``; output
``(B, out_channels, H, W[, D])`` logits (the paper's softmax is applied by the loss / post-processing).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monai.networks.layers.factories import Conv, Pool
from monai.networks.layers.utils import get_norm_layer

__all__ = ["AttentionGate", "AttentionSegNet"]


# TorchScript indexes a ModuleList only with a literal or through an interface type; the decoder runs coarsest
# stage first, so the stages are reached by a variable index through these two interfaces (argument names must match
# the modules' own: ``nn.Sequential.forward(input)``, ``AttentionGate.forward(x, g)``).
@torch.jit.interface
class _StageInterface(nn.Module):
    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        pass


@torch.jit.interface
class _GateInterface(nn.Module):
    def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pass


# VGG-16 encoder of SegNet: 64-128-256-512-512 channels, 2-2-3-3-3 convolutions per stage.
PAPER_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
PAPER_CONVS: tuple[int, ...] = (2, 2, 3, 3, 3)


def _conv_bn_relu(
    spatial_dims: int, in_ch: int, out_ch: int, kernel_size: int = 3, norm: str | tuple = "batch"
) -> nn.Sequential:
    return nn.Sequential(
        Conv[Conv.CONV, spatial_dims](in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False),
        get_norm_layer(norm, spatial_dims, out_ch),
        nn.ReLU(inplace=True),
    )


def _stage(spatial_dims: int, in_ch: int, out_ch: int, n_convs: int, norm: str | tuple = "batch") -> nn.Sequential:
    layers = [_conv_bn_relu(spatial_dims, in_ch, out_ch, norm=norm)]
    layers += [_conv_bn_relu(spatial_dims, out_ch, out_ch, norm=norm) for _ in range(n_convs - 1)]
    return nn.Sequential(*layers)


class AttentionGate(nn.Module):
    """Additive attention gate (paper Eq. 2); ``x`` and ``g`` have the same spatial size.

    Args:
        spatial_dims: 2 or 3.
        x_channels: channels of the skip features ``x``.
        g_channels: channels of the gating signal ``g``.
        inter_channels: channels of the joint ``W_x x + W_g g`` space.

    ``forward(x, g)`` returns ``(alpha * x, alpha)`` with ``alpha`` of shape ``(B, 1, *spatial)`` in (0, 1).
    """

    def __init__(self, spatial_dims: int, x_channels: int, g_channels: int, inter_channels: int) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.w_x = conv(x_channels, inter_channels, 1, bias=False)
        self.w_g = conv(g_channels, inter_channels, 1, bias=True)  # its bias is b_g
        self.psi = conv(inter_channels, 1, 1, bias=True)  # its bias is b_psi

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = torch.sigmoid(self.psi(torch.relu(self.w_x(x) + self.w_g(g))))
        return x * alpha, alpha


class AttentionSegNet(nn.Module):
    """SegNet encoder-decoder with max-pooling indices, optionally with attention-gated skip connections.

    Args:
        spatial_dims: 2 (CT slices, as in the paper) or 3.
        in_channels: input channels (1 for CT).
        out_channels: output classes (2: background, lesion).
        channels: encoder widths per stage; the paper's VGG-16 widths are ``PAPER_CHANNELS`` (64..512). The default
            is a slim variant that trains on a CPU and ships in the repo.
        convs_per_stage: conv-BN-ReLU blocks per encoder (and mirrored decoder) stage; paper ``PAPER_CONVS``.
        attention: add attention gates on the skip connections (A-SegNet); ``False`` gives plain SegNet.
        attention_reduction: ``inter_channels = max(1, x_channels // attention_reduction)`` in each gate.
        norm: normalisation after every convolution, a MONAI norm spec (``get_norm_layer``): ``"batch"`` as in
            SegNet and the paper; ``"instance"`` (affine-free, as in MONAI's UNet) is an option of this library.

    Input ``(B, in_channels, *spatial)``, every spatial size divisible by ``2 ** len(channels)``;
    output logits ``(B, out_channels, *spatial)``.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128, 128),
        convs_per_stage: Sequence[int] = (2, 2, 3, 3, 3),
        attention: bool = True,
        attention_reduction: int = 2,
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        if len(channels) != len(convs_per_stage):
            raise ValueError(
                f"channels {tuple(channels)} and convs_per_stage {tuple(convs_per_stage)} differ in length"
            )
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.attention = attention
        self.n_stages = len(channels)
        chans = [int(c) for c in channels]

        self.encoders = nn.ModuleList()
        prev = in_channels
        for c, n in zip(chans, convs_per_stage):
            self.encoders.append(_stage(spatial_dims, prev, c, n, norm))
            prev = c
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=2, stride=2, return_indices=True)
        # unpooling is a function call in forward: nn.MaxUnpool2d does not compile with TorchScript (torch 2.13)

        # decoder i mirrors encoder i: unpool to chans[i], then convs down to chans[i-1] (stage 0: to chans[0]).
        self.decoders = nn.ModuleList()
        for i, (c, n) in enumerate(zip(chans, convs_per_stage)):
            out_c = chans[i - 1] if i > 0 else chans[0]
            layers = [_conv_bn_relu(spatial_dims, c, c, norm=norm) for _ in range(n - 1)]
            layers += [_conv_bn_relu(spatial_dims, c, out_c, norm=norm)]
            self.decoders.append(nn.Sequential(*layers))

        # gates on the skips of stages 0..L-2 (the deepest pooled map is the decoder input itself)
        self.gates = nn.ModuleList()
        self.fuse = nn.ModuleList()
        if attention:
            for c in chans[:-1]:
                self.gates.append(AttentionGate(spatial_dims, c, c, max(1, c // attention_reduction)))
                self.fuse.append(_conv_bn_relu(spatial_dims, 2 * c, c, kernel_size=1, norm=norm))
        self.head = Conv[Conv.CONV, spatial_dims](chans[0], out_channels, 1)
        # the gates' alphas of the last eager forward, coarsest first (not an attribute of a scripted model)
        self.last_attention = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 2**self.n_stages
        if any([s % factor != 0 for s in x.shape[2:]]):
            raise ValueError(f"spatial size {list(x.shape[2:])} must be divisible by {factor}")
        skips: list[torch.Tensor] = []
        indices: list[torch.Tensor] = []
        sizes: list[list[int]] = []
        for enc in self.encoders:
            x = enc(x)
            sizes.append(list(x.shape))
            x, idx = self.pool(x)
            skips.append(x)
            indices.append(idx)

        alphas: list[torch.Tensor] = []
        d = skips[-1]
        for i in range(self.n_stages - 1, -1, -1):
            if self.attention and i < self.n_stages - 1:
                gate: _GateInterface = self.gates[i]
                fuse: _StageInterface = self.fuse[i]
                gated, alpha = gate.forward(skips[i], d)
                alphas.append(alpha)
                d = fuse.forward(torch.cat([d, gated], dim=1))
            if self.spatial_dims == 2:
                d = F.max_unpool2d(d, indices[i], kernel_size=2, stride=2, output_size=sizes[i])
            else:
                d = F.max_unpool3d(d, indices[i], kernel_size=2, stride=2, output_size=sizes[i])
            decoder: _StageInterface = self.decoders[i]
            d = decoder.forward(d)
        if not torch.jit.is_scripting():  # eager-mode diagnostics only; a scripted model returns the logits alone
            self.last_attention = [a.detach() for a in alphas]
        return self.head(d)
