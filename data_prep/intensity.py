"""Intensity transforms: HU window (seed 000) and gamma–sigmoid tone mapping (seed 004).

Array transforms take numpy arrays or torch tensors of any shape (channel-first for MONAI pipelines) and return
the same type; the ``d`` versions apply them to the given keys of a data dictionary.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, ScaleIntensityRange, Transform
from monai.utils import convert_data_type, convert_to_dst_type

__all__ = ["HUWindow", "HUWindowd", "ToneMap", "ToneMapd", "hu_window", "tone_map", "LESION_WINDOW"]

#: Default window of seed 000 (A-SegNet): HU in [-1024, 600] -> [0, 1].
LESION_WINDOW = (-1024.0, 600.0)


class HUWindow(Transform):
    """Clip Hounsfield units to ``[hu_min, hu_max]`` and scale linearly to ``[0, 1]``.

    Built on :class:`monai.transforms.ScaleIntensityRange`; defaults are the A-SegNet paper's window
    (-1024 to 600 HU). Input: HU array of any shape; output: float32, same shape and type.
    """

    backend = ScaleIntensityRange.backend

    def __init__(self, hu_min: float = LESION_WINDOW[0], hu_max: float = LESION_WINDOW[1], clip: bool = True) -> None:
        if hu_max <= hu_min:
            raise ValueError(f"hu_max ({hu_max}) must be greater than hu_min ({hu_min})")
        self.hu_min, self.hu_max = float(hu_min), float(hu_max)
        self._scale = ScaleIntensityRange(
            a_min=self.hu_min, a_max=self.hu_max, b_min=0.0, b_max=1.0, clip=clip, dtype=np.float32
        )

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        out, *_ = convert_to_dst_type(self._scale(img), dst=img, dtype=np.float32 if isinstance(img, np.ndarray) else torch.float32)
        return out


class HUWindowd(MapTransform):
    """Dictionary version of :class:`HUWindow`."""

    backend = HUWindow.backend

    def __init__(
        self,
        keys: KeysCollection,
        hu_min: float = LESION_WINDOW[0],
        hu_max: float = LESION_WINDOW[1],
        clip: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.window = HUWindow(hu_min, hu_max, clip)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.window(d[key])
        return d


class ToneMap(Transform):
    """Global inverse-gamma + sigmoid tone mapping, ResNeXt+ paper (seed 004) Sec. III-A2, Eq. 5.

    ``I_out = 1 / (1 + exp(-a * I_in^(1/gamma)))`` with ``gamma = 1.5``, ``a = 0.35``.

    The paper does not say on which scale ``I_in`` lies. The input here is a windowed image in ``[0, 1]`` (e.g. the
    output of :class:`HUWindow`) multiplied by ``input_scale`` before Eq. 5. The default ``input_scale=1`` gives a
    gamma-like curve that brightens dark (lung) values and compresses bright ones while keeping the whole range in
    use; ``input_scale=255`` reads Eq. 5 on 8-bit values, where everything above about 0.1 of the window
    saturates (lung against everything else). The sigmoid output lies in ``[0.5, s_max]``; with ``rescale=True``
    (default) it is mapped linearly to ``[0, 1]``. Input: any shape; output: float32, same shape and type.
    """

    backend = [*HUWindow.backend]

    def __init__(self, gamma: float = 1.5, a: float = 0.35, input_scale: float = 1.0, rescale: bool = True) -> None:
        if gamma <= 0 or input_scale <= 0:
            raise ValueError("gamma and input_scale must be positive")
        self.gamma, self.a, self.input_scale, self.rescale = float(gamma), float(a), float(input_scale), rescale

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        x, *_ = convert_data_type(img, torch.Tensor, dtype=torch.float32)
        x = x.clamp(0.0, 1.0) * self.input_scale
        y = torch.sigmoid(self.a * x.pow(1.0 / self.gamma))
        if self.rescale:
            s_max = 1.0 / (1.0 + np.exp(-self.a * self.input_scale ** (1.0 / self.gamma)))
            y = (y - 0.5) / (s_max - 0.5)
        out, *_ = convert_to_dst_type(y, dst=img, dtype=torch.float32 if isinstance(img, torch.Tensor) else np.float32)
        return out


class ToneMapd(MapTransform):
    """Dictionary version of :class:`ToneMap`."""

    backend = ToneMap.backend

    def __init__(
        self,
        keys: KeysCollection,
        gamma: float = 1.5,
        a: float = 0.35,
        input_scale: float = 1.0,
        rescale: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.tone_map = ToneMap(gamma, a, input_scale, rescale)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.tone_map(d[key])
        return d


def hu_window(hu: NdarrayOrTensor, hu_min: float = LESION_WINDOW[0], hu_max: float = LESION_WINDOW[1]) -> NdarrayOrTensor:
    """Functional form of :class:`HUWindow`."""
    return HUWindow(hu_min, hu_max)(hu)


def tone_map(img: NdarrayOrTensor, gamma: float = 1.5, a: float = 0.35) -> NdarrayOrTensor:
    """Functional form of :class:`ToneMap`."""
    return ToneMap(gamma, a)(img)
