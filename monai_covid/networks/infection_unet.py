"""U-Net with a DenseNet-121 encoder for COVID-19 infection segmentation on chest X-rays.

Degerli A., Ahishali M., Yamac M. et al., "COVID-19 infection map generation and detection from chest X-ray
images", Health Inf Sci Syst 9, 15 (2021), section "COVID-19 infected region segmentation": the leading model is a
U-Net whose encoder is DenseNet-121 (Huang et al. 2017), trained with a focal + Dice hybrid loss; its sigmoid output
is the per-pixel infection probability used for the infection map and for COVID-19 detection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from monai.networks.layers.utils import get_act_layer
from monai.networks.nets import DenseNet121
from monai.networks.nets.flexible_unet import SegmentationHead, UNetDecoder

__all__ = ["InfectionUNet", "PAPER_DENSENET121"]

#: Constructor arguments of the paper-size network (DenseNet-121 as published: k=32, 64 initial features, ~7M
#: encoder parameters; the decoder widths are the usual U-Net decoder of segmentation_models, which the paper used).
PAPER_DENSENET121: dict = {
    "growth_rate": 32,
    "init_features": 64,
    "decoder_channels": (256, 128, 64, 32, 16),
}


class InfectionUNet(nn.Module):
    """U-Net whose encoder is a DenseNet-121 (block layout 6, 12, 24, 16) and whose decoder takes skips from it.

    The encoder is ``monai.networks.nets.DenseNet121(...).features`` without the classification head. Skip
    connections come from the stem (stride 2) and from the outputs of dense blocks 1-3 (strides 4, 8, 16); the
    normalised output of dense block 4 (stride 32) is the bottleneck. The decoder is MONAI's U-Net decoder
    (``UNetDecoder``: upsample x2, concatenate the skip, two conv-norm-act) followed by a 3x3 segmentation head, so
    the output has the input's spatial size.

    The defaults are a slim DenseNet-121 (``growth_rate=12``, ``init_features=24``, decoder 64-48-32-16-8: ~1.6M
    parameters, 3.2 MB in fp16) that trains on a CPU; ``InfectionUNet(**PAPER_DENSENET121)`` is the paper-size network
    (~12.8M parameters).

    Args:
        spatial_dims: 2 for X-rays (3 works as well).
        in_channels: image channels (1 for grey-scale X-rays).
        out_channels: 1, the infection logit.
        growth_rate: DenseNet growth rate k (paper: 32).
        init_features: channels of the stem convolution (paper: 64).
        bn_size: bottleneck width factor of the dense layers (DenseNet: 4).
        block_config: dense layers per block (DenseNet-121: (6, 12, 24, 16)).
        decoder_channels: output channels of the five decoder stages, deepest first.
        norm: normalisation of encoder and decoder.
        act: activation of encoder and decoder.
        dropout: dropout of the decoder convolutions.
        upsample: ``"nontrainable"`` (interpolation), ``"deconv"`` or ``"pixelshuffle"``.

    Shapes:
        input ``(B, in_channels, H, W)`` (any H, W; other than multiples of 32 they are padded and cropped back),
        output ``(B, out_channels, H, W)`` raw logits (apply a sigmoid for probabilities).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        growth_rate: int = 12,
        init_features: int = 24,
        bn_size: int = 4,
        block_config: Sequence[int] = (6, 12, 24, 16),
        decoder_channels: Sequence[int] = (64, 48, 32, 16, 8),
        norm: str | tuple = "batch",
        act: str | tuple = ("relu", {"inplace": True}),
        dropout: float = 0.0,
        upsample: str = "nontrainable",
    ) -> None:
        super().__init__()
        if len(block_config) != 4 or len(decoder_channels) != 5:
            raise ValueError("block_config needs 4 dense blocks and decoder_channels 5 stages (strides 32 -> 1).")
        densenet = DenseNet121(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=1,
            init_features=init_features,
            growth_rate=growth_rate,
            block_config=tuple(block_config),
            bn_size=bn_size,
            norm=norm,
            act=act,
        )
        # the classification head is not part of the encoder
        self.encoder = densenet.features
        self.encoder_act = get_act_layer(act)
        # positions in the encoder of the stem activation and dense blocks 1-3, whose outputs are the skips (a list of
        # ints rather than names, so that ``encode`` compiles with TorchScript)
        names = [name for name, _ in self.encoder.named_children()]
        self._skip_layers = [names.index(n) for n in ("relu0", "denseblock1", "denseblock2", "denseblock3")]

        channels = [init_features]
        c = init_features
        for i, n in enumerate(block_config):
            c += n * growth_rate
            channels.append(c)
            if i < len(block_config) - 1:
                c //= 2
        self.encoder_channels = tuple(channels)
        self.decoder = UNetDecoder(
            spatial_dims=spatial_dims,
            encoder_channels=(in_channels, *channels),
            decoder_channels=tuple(decoder_channels),
            act=act,
            norm=norm,
            dropout=dropout,
            bias=False,
            upsample=upsample,
            pre_conv="default",
            interp_mode="nearest",
            align_corners=None,
            is_pad=True,
        )
        self.segmentation_head = SegmentationHead(
            spatial_dims=spatial_dims, in_channels=decoder_channels[-1], out_channels=out_channels, kernel_size=3
        )

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features at strides 2, 4, 8, 16, 32 with ``self.encoder_channels`` channels."""
        feats: list[torch.Tensor] = []
        for i, layer in enumerate(self.encoder):
            x = layer(x)
            if i in self._skip_layers:
                feats.append(x)
        feats.append(self.encoder_act(x))  # after norm5
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the stem's rounding breaks the skips unless sizes divide by 32: pad (replicate) and crop back
        size = list(x.shape[2:])
        pad: list[int] = []
        for d in range(len(size) - 1, -1, -1):  # F.pad takes the last dimension first
            pad += [0, (-size[d]) % 32]
        if any([p != 0 for p in pad]):
            x = nn.functional.pad(x, pad, mode="replicate")
        out = self.segmentation_head(self.decoder(self.encode(x), skip_connect=4))
        for d, s in enumerate(size):
            out = out.narrow(2 + d, 0, s)
        return out
