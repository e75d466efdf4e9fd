"""Image-source artefacts as training augmentation: JPEG compression of an intensity image.

CT images taken from figures of papers (UCSD COVID-CT) went through JPEG compression, sometimes several times; the
SARS-CoV-2 CT-scan screenshots did not. Training with random JPEG round trips teaches the classifier to ignore
block and ringing artefacts. MONAI has no JPEG transform; this one follows the array + dictionary pattern of
``monai.transforms`` (``RandJpegArtefact`` / ``RandJpegArtefactd``).
"""

from __future__ import annotations

import io
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform

__all__ = ["jpeg_roundtrip", "RandJpegArtefact", "RandJpegArtefactd"]


def jpeg_roundtrip(image: np.ndarray | torch.Tensor, quality: int) -> np.ndarray | torch.Tensor:
    """Encode ``image`` (``C x H x W`` in ``[0, 1]``) as 8-bit grey JPEG at ``quality`` and decode it; same type out.

    Each channel is compressed on its own; values outside ``[0, 1]`` are clipped.
    """
    from PIL import Image

    is_tensor = torch.is_tensor(image)
    arr = image.detach().cpu().numpy() if is_tensor else np.asarray(image)
    if arr.ndim != 3:
        raise ValueError(f"expected a channel-first 2D image (C x H x W), got shape {arr.shape}")
    out = np.empty(arr.shape, dtype=np.float32)
    for c in range(arr.shape[0]):
        u8 = np.round(np.clip(arr[c], 0.0, 1.0) * 255.0).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(u8, mode="L").save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        with Image.open(buf) as img:
            out[c] = np.asarray(img, dtype=np.float32) / 255.0
    if is_tensor:
        res = torch.as_tensor(out, device=image.device, dtype=image.dtype if image.is_floating_point() else torch.float32)
        if hasattr(image, "meta"):  # keep MetaTensor metadata
            res = type(image)(res, meta=image.meta)
        return res
    return out.astype(arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float32)


class RandJpegArtefact(RandomizableTransform):
    """With probability ``prob``, a JPEG round trip at a quality drawn uniformly from ``quality_range``.

    Args:
        prob: probability of applying the round trip.
        quality_range: (lowest, highest) JPEG quality, inclusive (PIL scale 1-95).
    """

    def __init__(self, prob: float = 0.3, quality_range: Sequence[int] = (20, 80)) -> None:
        RandomizableTransform.__init__(self, prob)
        lo, hi = int(quality_range[0]), int(quality_range[1])
        if not 1 <= lo <= hi <= 95:
            raise ValueError(f"quality_range must satisfy 1 <= low <= high <= 95, got {quality_range}")
        self.quality_range = (lo, hi)
        self.quality = hi

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.quality = int(self.R.randint(self.quality_range[0], self.quality_range[1] + 1))

    def __call__(self, img: np.ndarray | torch.Tensor, randomize: bool = True) -> np.ndarray | torch.Tensor:
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        return jpeg_roundtrip(img, self.quality)


class RandJpegArtefactd(RandomizableTransform, MapTransform):
    """Dictionary version of :class:`RandJpegArtefact` (one draw shared by all ``keys``)."""

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.3,
        quality_range: Sequence[int] = (20, 80),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.jpeg = RandJpegArtefact(prob=1.0, quality_range=quality_range)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.jpeg.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, np.ndarray | torch.Tensor]) -> dict[Hashable, np.ndarray | torch.Tensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        self.jpeg.randomize()
        for key in self.key_iterator(d):
            d[key] = self.jpeg(d[key], randomize=False)
        return d
