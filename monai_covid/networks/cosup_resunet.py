"""Co-supervision ResUnet: residual U-Net with edge, auxiliary semantic and attention-fusion modules.

Hu H, Shen L, Guan Q, Li X, Zhou Q, Ruan S. "Deep Co-supervision and Attention Fusion Strategy for Automatic
COVID-19 Lung Infection Segmentation on CT Images", Pattern Recognition 124:108452 (2022), arXiv:2112.10368.

Only the abstract is available to this project, so the modules below are designed from it (each decision is listed
in ``bundles/covid_ct_lesion_cosup_resunet/docs/README.md``):

- **ResUnet baseline** — a U-Net whose encoder and decoder stages are residual units
  (:class:`monai.networks.blocks.ResidualUnit`, two conv-BN-ReLU sub-units plus a projected identity); stride-2
  residual units down-sample, 2x2 transposed convolutions up-sample, skips are concatenated.
- **Edge Supervised Module (ESM)** — "edge supervised information in the initial stage of down-sampling": the
  first two encoder stages (full and 1/2 resolution; the latter up-sampled) are concatenated, fused by a 3x3
  conv-BN-ReLU into an edge feature map, and a 1x1 head predicts lesion-boundary logits ``(B, 1, H, W)``. The
  target is the morphological gradient of the mask (:func:`monai_covid.losses.morphological_edge`).
- **Auxiliary Semantic Supervised Module (ASSM)** — "mask supervised information in the later stage": 1x1 heads on
  the two coarsest decoder stages (1/8 and 1/4 resolution with five levels) predict lesion logits, supervised with
  the mask down-sampled to their size (deep supervision).
- **Attention Fusion Module (AFM)** — "fuse multiple scale feature maps of different levels by an attention
  mechanism": the full-resolution decoder output, the 1/2 and 1/4 decoder stages (1x1-projected and up-sampled)
  and, with ESM, the edge features are weighted by per-pixel attention maps (3x3 conv-BN-ReLU, 1x1 conv, softmax
  over the branches); the weighted sum is added to the decoder output before the 1x1 segmentation head (so AFM
  starts from the baseline path). Without AFM the head sees the decoder output only.

``edge``, ``aux`` and ``fusion`` switch each module off (all three off: the plain ResUnet baseline). The heads of
ESM and ASSM are only used in training (their weights stay in the state dict); the segmentation path does not
depend on them (the edge *features* do feed AFM).

Shapes: input ``(B, in_channels, H, W[, D])``, each spatial size divisible by ``2 ** (len(channels) - 1)``.
In eval mode ``forward`` returns the segmentation logits ``(B, out_channels, H, W[, D])`` only, so the network is a
drop-in for any MONAI inferer. In training mode it returns a dict: ``"seg"`` as above, ``"edge"``
``(B, 1, H, W[, D])`` boundary logits (with ``edge``), ``"aux"`` a list of ``(B, out_channels, H / 2**k, ...)``
logits, coarsest first (with ``aux``); :class:`monai_covid.losses.CoSupervisionLoss` takes that dict and
:func:`seg_logits` picks the segmentation head for metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from monai.networks.blocks import ResidualUnit
from monai.networks.layers.factories import Conv
from monai.networks.layers.utils import get_norm_layer

__all__ = ["CoSupResUnet", "seg_logits"]


def seg_logits(output: torch.Tensor | Mapping[str, Any]) -> torch.Tensor:
    """The segmentation logits of a :class:`CoSupResUnet` output (the ``"seg"`` entry in training mode)."""
    return output["seg"] if isinstance(output, Mapping) else output


def _conv_bn_relu(
    spatial_dims: int, in_ch: int, out_ch: int, kernel_size: int = 3, norm: str | tuple = "batch"
) -> nn.Sequential:
    return nn.Sequential(
        Conv[Conv.CONV, spatial_dims](in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False),
        get_norm_layer(norm, spatial_dims, out_ch),
        nn.ReLU(inplace=True),
    )


def _resize(x: torch.Tensor, size: list[int]) -> torch.Tensor:
    if list(x.shape[2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear" if x.dim() == 4 else "trilinear", align_corners=False)


# TorchScript indexes a ModuleList only with a literal or through an interface type; the decoder runs coarsest level
# first, so its units are reached by a variable index through these interfaces (argument names must
# match the modules' own: ``ConvTranspose.forward(input, output_size)``, ``ResidualUnit.forward(x)``; an interface
# keeps no default values, so ``output_size=None`` is passed explicitly).
@torch.jit.interface
class _UpInterface(nn.Module):
    def forward(self, input: torch.Tensor, output_size: Optional[list[int]] = None) -> torch.Tensor:  # noqa: A002
        pass


@torch.jit.interface
class _UnitInterface(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pass


class CoSupResUnet(nn.Module):
    """Residual U-Net with the paper's Edge Supervised, Auxiliary Semantic Supervised and Attention Fusion modules.

    Args:
        spatial_dims: 2 (the paper's CT slices) or 3.
        in_channels: input channels (1 for CT).
        out_channels: classes of the segmentation and auxiliary heads (2: background, lesion).
        channels: width of each resolution level, finest first; at least 4 levels. The default is the slim width
            whose weights the bundle ships (0.6 M parameters); the paper's width is not in its abstract.
        edge: Edge Supervised Module (edge branch and head on the first two encoder stages).
        aux: Auxiliary Semantic Supervised Module (deep-supervision heads on the coarsest decoder stages).
        aux_levels: how many decoder stages get an auxiliary head, coarsest first.
        fusion: Attention Fusion Module before the segmentation head.
        norm: normalisation of every residual unit and conv block, a MONAI norm spec (``get_norm_layer``):
            ``"batch"`` (the shipped models), or e.g. ``"instance"`` (affine-free, as in MONAI's UNet).
    """

    # constants for TorchScript: a branch on a switched-off module (an absent submodule) is not compiled
    __constants__ = ["use_edge", "use_aux", "use_fusion"]

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (8, 16, 32, 64, 128),
        edge: bool = True,
        aux: bool = True,
        aux_levels: int = 2,
        fusion: bool = True,
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        ch = tuple(int(c) for c in channels)
        if len(ch) < 4:
            raise ValueError(f"channels needs at least 4 levels, got {ch}")
        if aux and not 1 <= aux_levels <= len(ch) - 2:
            raise ValueError(f"aux_levels must be in 1..{len(ch) - 2}, got {aux_levels}")
        self.spatial_dims, self.use_edge, self.use_aux, self.use_fusion = spatial_dims, edge, aux, fusion

        def res_unit(cin: int, cout: int, stride: int) -> ResidualUnit:
            return ResidualUnit(spatial_dims, cin, cout, strides=stride, subunits=2, act="RELU", norm=norm)

        self.encoder = nn.ModuleList(
            [res_unit(in_channels, ch[0], 1)] + [res_unit(ch[i - 1], ch[i], 2) for i in range(1, len(ch))]
        )
        conv_t = Conv[Conv.CONVTRANS, spatial_dims]
        # decoder level i (len(ch)-2 .. 0): up-sample level i+1 to ch[i], concatenate the skip, residual unit
        self.up = nn.ModuleList([conv_t(ch[i + 1], ch[i], 2, stride=2) for i in range(len(ch) - 1)])
        self.decoder = nn.ModuleList([res_unit(2 * ch[i], ch[i], 1) for i in range(len(ch) - 1)])
        conv1 = Conv[Conv.CONV, spatial_dims]

        if edge:
            self.edge_block = _conv_bn_relu(spatial_dims, ch[0] + ch[1], ch[0], norm=norm)
            self.edge_head = conv1(ch[0], 1, 1)
        if aux:
            # decoder stages len(ch)-2, len(ch)-3, ...: the coarsest (most semantic) ones
            self.aux_stages = [len(ch) - 2 - k for k in range(aux_levels)]
            self.aux_heads = nn.ModuleList([conv1(ch[i], out_channels, 1) for i in self.aux_stages])
        if fusion:
            # branches: decoder output (level 0), projected decoder levels 1 and 2, and the edge features
            self.fusion_proj = nn.ModuleList([conv1(ch[i], ch[0], 1) for i in (1, 2)])
            n_branches = 3 + int(edge)
            self.fusion_gate = nn.Sequential(
                _conv_bn_relu(spatial_dims, n_branches * ch[0], ch[0], norm=norm), conv1(ch[0], n_branches, 1)
            )
        self.head = conv1(ch[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, Any]:
        skips: list[torch.Tensor] = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        dec = skips[:-1]  # dec[i]: decoder output at level i (the skips are placeholders until then)
        for i in range(len(dec) - 1, -1, -1):
            up: _UpInterface = self.up[i]
            unit: _UnitInterface = self.decoder[i]
            x = unit.forward(torch.cat([up.forward(x, None), skips[i]], dim=1))
            dec[i] = x
        size = list(skips[0].shape[2:])
        edge_feat: Optional[torch.Tensor] = None
        if self.use_edge:
            edge_feat = self.edge_block(torch.cat([skips[0], _resize(skips[1], size)], dim=1))
        feat = dec[0]
        if self.use_fusion:
            branches = [dec[0]]
            for k, proj in enumerate(self.fusion_proj):  # decoder levels 1 and 2
                branches.append(_resize(proj(dec[k + 1]), size))
            if edge_feat is not None:
                branches.append(edge_feat)
            weights = torch.softmax(self.fusion_gate(torch.cat(branches, dim=1)), dim=1)
            fused = weights[:, 0:1] * branches[0]
            for k in range(1, len(branches)):
                fused = fused + weights[:, k : k + 1] * branches[k]
            # residual: the fused features add to the decoder output, so AFM starts from the baseline path
            feat = dec[0] + fused
        seg = self.head(feat)
        # a scripted model is the inference path: the training-only outputs below are not compiled
        if not torch.jit.is_scripting():
            if self.training:
                out: dict[str, Any] = {"seg": seg}
                if edge_feat is not None:
                    out["edge"] = self.edge_head(edge_feat)
                if self.use_aux:
                    out["aux"] = [h(dec[i]) for h, i in zip(self.aux_heads, self.aux_stages)]
                return out
        return seg
