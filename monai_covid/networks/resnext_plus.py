"""ResNeXt+ : CT volume COVID-19 detector trained from volume labels, with slice-level output.

Mohammed, Wang, Zhao, Ullah, Naseem, Wang, Pedersen, Alaya Cheikh, "Semi-supervised Network for Detection of
COVID-19 in Chest CT Scans", IEEE Access 2020 (paper 004 in ``../shared/papers``):

- Section III-B / Fig. 1: each slice and its binary lung mask go through their own 7x7 stem convolution, the two
  feature maps are summed (fusion in the first layer), then a ResNeXt trunk (grouped 3x3 convolutions, [61]).
- Section III-C, eqs. 6-11: CBAM right after the fusion; channel attention ``M_c = sigmoid(MLP(avg) + MLP(max))``
  with a shared MLP of reduction ``r``, spatial attention ``M_s = sigmoid(conv9x9([avg_c; max_c]))``.
- Section IV: per-slice feature vectors -> bidirectional LSTM along the axial direction (512 per direction).
- Section IV-1, eqs. 18-19: slice attention ``alpha_n = softmax_n(w^T tanh(B f_n))``, ``S = sum_n alpha_n f_n``,
  then a fully connected layer (1024 hidden) -> 2 classes (volume logits).

Per-slice score (our addition, the paper reads slice predictions off the attention): the same classification head
applied to each slice's spatio-axial feature ``f_n``, ``slice_score_n = softmax(head(f_n))[1]`` in [0, 1]. It lives on
the same scale as the volume probability, so it can be thresholded and trained with a MIL loss; the attention
``alpha_n`` (sums to 1 over the slices) is returned as well.

Shapes (MONAI's channel-first layout, the slices along the first spatial axis): input ``x`` (B, 2, N, H, W) with
channel 0 the CT slice (intensities in [0, 1]) and channel 1 the lung mask (0/1), or (B, 1, N, H, W) when
``use_lung_mask=False``; B volumes of N slices each. ``forward`` returns the volume logits (B, 2) (what
``monai.bundle verify_net_in_out`` and a TorchScript export see); :meth:`forward_details` returns
``(logits (B, 2), attention (B, N), slice_scores (B, N))``. :meth:`slice_features` maps (M, C, H, W) slices to
(M, F) features and :meth:`head_from_features` the (B, N, F) sequence to the outputs, so long volumes can be encoded
in chunks. The module is ``torch.jit.script``-able (``forward`` and the exported ``forward_details``).

The default widths/depths are a slim CPU variant (about 1 M parameters); :meth:`ResNeXtPlus.paper` gives the
paper's ResNeXt-50 (32x4d) trunk, 512-unit LSTMs and a 1024-unit head. Ablations of Table 2: ``use_cbam=False``
(N-SCA) and ``use_lung_mask=False`` (N-MSCA together with ``use_cbam=False``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution

__all__ = ["ResNeXtPlus", "CBAM", "ResNeXtBottleneck", "SliceAttention"]


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> Convolution:
    return Convolution(
        spatial_dims=2,
        in_channels=cin,
        out_channels=cout,
        strides=stride,
        kernel_size=k,
        groups=groups,
        act="RELU" if act else None,
        norm="BATCH",
        bias=False,
        padding=k // 2,
    )


class CBAM(nn.Module):
    """Convolutional block attention (paper 004, eqs. 6-11): (B, C, H, W) -> (B, C, H, W).

    After a call, ``last_channel_map`` (B, C, 1, 1) and ``last_spatial_map`` (B, 1, H, W) hold the sigmoid maps
    (empty tensors before the first call).
    """

    def __init__(self, channels: int, reduction: int = 16, spatial_kernel: int = 9) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=True), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1, bias=True)
        )
        self.spatial = nn.Conv2d(2, 1, spatial_kernel, padding=spatial_kernel // 2, bias=False)
        self.last_channel_map = torch.empty(0)
        self.last_spatial_map = torch.empty(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = F.adaptive_avg_pool2d(x, 1)
        mx = F.adaptive_max_pool2d(x, 1)
        m_c = torch.sigmoid(self.mlp(avg) + self.mlp(mx))
        x = x * m_c
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        m_s = torch.sigmoid(self.spatial(pooled))
        self.last_channel_map, self.last_spatial_map = m_c.detach(), m_s.detach()
        return x * m_s


class ResNeXtBottleneck(nn.Module):
    """ResNeXt block [61]: 1x1 -> grouped 3x3 (``cardinality`` groups, stride) -> 1x1, plus projection shortcut."""

    def __init__(self, in_channels: int, out_channels: int, width: int, cardinality: int, stride: int = 1) -> None:
        super().__init__()
        if width % cardinality:
            raise ValueError(f"bottleneck width {width} is not divisible by cardinality {cardinality}")
        self.conv1 = _conv(in_channels, width, 1)
        self.conv2 = _conv(width, width, 3, stride=stride, groups=cardinality)
        self.conv3 = _conv(width, out_channels, 1, act=False)
        self.shortcut: nn.Module = (
            _conv(in_channels, out_channels, 1, stride=stride, act=False)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


class SliceAttention(nn.Module):
    """Eq. 19: ``alpha_n = softmax_n(w^T tanh(B f_n))``; (B, N, F) -> (B, N), summing to 1 over N."""

    def __init__(self, features: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(features, hidden, bias=False)  # B
        self.score = nn.Linear(hidden, 1, bias=False)  # w

    def forward(self, f: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        logits = self.score(torch.tanh(self.proj(f))).squeeze(-1)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        return torch.softmax(logits, dim=-1)


class ResNeXtPlus(nn.Module):
    """ResNeXt+ volume classifier with slice attention (see module docstring for the paper and shapes).

    Args:
        in_channels: channels of the CT slice (1).
        stem_channels: output channels of each 7x7 stem convolution (paper: 64).
        channels: output channels of the ResNeXt stages (paper: 256, 512, 1024, 2048).
        layers: blocks per stage (paper ResNeXt-50: 3, 4, 6, 3).
        cardinality: groups of the 3x3 convolutions (paper: 32).
        bottleneck_ratio: bottleneck width / stage output channels (ResNeXt-50 32x4d: 0.5).
        reduction: channel-attention MLP reduction ``r`` (CBAM default 16).
        lstm_hidden: units per LSTM direction (paper: 512).
        attention_hidden: hidden units of the slice attention (paper: not given; we use ``2 * lstm_hidden``).
        fc_hidden: hidden units of the classification head (paper: 1024).
        num_classes: 2 (non-COVID, COVID).
        dropout: dropout before the head's output layer.
        use_cbam: False for the N-SCA ablation.
        use_lung_mask: False for the no-mask ablation (input then has 1 channel per slice, extra ones are ignored).
    """

    def __init__(
        self,
        in_channels: int = 1,
        stem_channels: int = 32,
        channels: Sequence[int] = (32, 64, 128, 256),
        layers: Sequence[int] = (1, 1, 1, 1),
        cardinality: int = 8,
        bottleneck_ratio: float = 0.5,
        reduction: int = 8,
        lstm_hidden: int = 128,
        attention_hidden: int | None = None,
        fc_hidden: int = 256,
        num_classes: int = 2,
        dropout: float = 0.2,
        use_cbam: bool = True,
        use_lung_mask: bool = True,
    ) -> None:
        super().__init__()
        if len(channels) != len(layers):
            raise ValueError(f"channels {channels} and layers {layers} must have the same length")
        self.in_channels = in_channels
        self.use_cbam = use_cbam
        self.use_lung_mask = use_lung_mask
        self.bn_frozen = False
        self.slice_stem = nn.Conv2d(in_channels, stem_channels, 7, stride=2, padding=3, bias=False)
        self.mask_stem: Optional[nn.Module] = (
            nn.Conv2d(1, stem_channels, 7, stride=2, padding=3, bias=False) if use_lung_mask else None
        )
        self.stem_norm = nn.Sequential(nn.BatchNorm2d(stem_channels), nn.ReLU(inplace=True))
        self.cbam: nn.Module = CBAM(stem_channels, reduction) if use_cbam else nn.Identity()
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        blocks: list[nn.Module] = []
        cin = stem_channels
        for i, (cout, n) in enumerate(zip(channels, layers)):
            width = max(cardinality, int(round(cout * bottleneck_ratio / cardinality)) * cardinality)
            for j in range(n):
                blocks.append(ResNeXtBottleneck(cin, cout, width, cardinality, stride=2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.trunk = nn.Sequential(*blocks)
        self.feature_dim = cin
        self.lstm = nn.LSTM(cin, lstm_hidden, batch_first=True, bidirectional=True)
        for name, p in self.lstm.named_parameters():  # paper: LSTM initialised from N(0, 0.01)
            nn.init.normal_(p, 0.0, 0.1) if "weight" in name else nn.init.zeros_(p)
        seq_dim = 2 * lstm_hidden
        self.slice_attention = SliceAttention(seq_dim, attention_hidden or seq_dim)
        self.head = nn.Sequential(
            nn.Linear(seq_dim, fc_hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(fc_hidden, num_classes)
        )

    @classmethod
    def paper(cls, **overrides: Any) -> ResNeXtPlus:
        """The paper's size: ResNeXt-50 (32x4d) trunk, 64-channel stems, 512-unit LSTMs, 1024-unit head."""
        kwargs: dict[str, Any] = dict(
            stem_channels=64,
            channels=(256, 512, 1024, 2048),
            layers=(3, 4, 6, 3),
            cardinality=32,
            bottleneck_ratio=0.5,
            reduction=16,
            lstm_hidden=512,
            attention_hidden=1024,
            fc_hidden=1024,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def freeze_batchnorm(self, frozen: bool = True) -> ResNeXtPlus:
        """Keep batch-norm running statistics fixed (eval mode) even in ``train()`` (paper: BN estimates disabled)."""
        self.bn_frozen = frozen
        return self.train(self.training)

    def train(self, mode: bool = True) -> ResNeXtPlus:
        super().train(mode)
        if mode and self.bn_frozen:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def slice_features(self, slices: torch.Tensor) -> torch.Tensor:
        """(M, C, H, W) slices (+ lung mask channel) -> (M, feature_dim) spatial features."""
        img = slices[:, : self.in_channels]
        x = self.slice_stem(img)
        mask_stem = self.mask_stem
        if mask_stem is not None:
            if slices.shape[1] < self.in_channels + 1:
                raise ValueError("expected a lung-mask channel after the CT channel(s)")
            x = x + mask_stem(slices[:, self.in_channels : self.in_channels + 1])
        x = self.pool(self.cbam(self.stem_norm(x)))
        x = self.trunk(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def head_from_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, feature_dim) -> (volume logits (B, 2), attention (B, N), slice scores (B, N))."""
        f, _ = self.lstm(features)
        alpha = self.slice_attention(f)
        pooled = (alpha.unsqueeze(-1) * f).sum(dim=1)
        logits = self.head(pooled)
        slice_scores = torch.softmax(self.head(f), dim=-1)[..., 1]
        return logits, alpha, slice_scores

    @torch.jit.export
    def forward_details(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, C, N, H, W) -> (volume logits (B, 2), attention (B, N), slice scores (B, N))."""
        if x.dim() != 5:
            raise ValueError("expected a (B, C, N, H, W) batch of volumes (channel first, slices along axis 2)")
        b, n = x.shape[0], x.shape[2]
        slices = x.transpose(1, 2).flatten(0, 1)  # (B * N, C, H, W)
        feats = self.slice_features(slices).view(b, n, -1)
        return self.head_from_features(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, N, H, W) -> volume logits (B, 2)."""
        return self.forward_details(x)[0]
