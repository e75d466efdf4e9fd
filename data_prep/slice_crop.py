"""Crop a windowed 2D CT slice (an 8-bit screenshot or figure, window unknown) to its lungs.

Why (COVID CT-Net, issue 20): the SARS-CoV-2 CT-scan slices are screenshots cropped close to the lungs, while the
UCSD COVID-CT images are figures of papers, many showing the whole body, the table and a black frame. A classifier
trained on the first sees a different field of view in the second; cropping every image to its lung box puts both
on one scale before resizing.

Box: the bounding box of :func:`monai_covid.volume_detector.lung_mask_8bit`, mirrored left-right about the centre of
the body (the mask sometimes finds one lung only, e.g. next to a dense consolidation), plus a margin, inside the
image. When the mask is implausibly small (< ``min_lung_fraction`` of the image) or the lung box is (<
``min_box_fraction`` of the image: a trachea or one lung base found alone; 4 of the 416 SARS-CoV-2 + UCSD val
images) the body box is used, and when that fails the whole image (the crop is never empty). On the SARS-CoV-2 set
(screenshots already cropped close to the lungs) the box keeps a median 97 % of the image; on UCSD val a median 75 %.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_data_type, convert_to_dst_type
from scipy import ndimage as ndi

__all__ = ["BOX_KEY", "body_box_8bit", "lung_box_8bit", "LungCrop", "LungCropd"]

#: MetaTensor meta key of the crop box: tensor ``[y0, y1, x0, x1, H, W]`` (box and the original image size)
BOX_KEY = "lung_crop_box"


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def body_box_8bit(u8: np.ndarray) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` of the largest connected region brighter than the image's Otsu level (the body wall
    and mediastinum; the table is usually a separate thin part), holes filled; the whole image when none."""
    from skimage.filters import threshold_otsu

    a = np.asarray(u8, dtype=np.float32)
    h, w = a.shape
    if a.max() <= a.min():
        return 0, h, 0, w
    labels, n = ndi.label(a >= threshold_otsu(a))
    if n == 0:
        return 0, h, 0, w
    largest = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    return _bbox(ndi.binary_fill_holes(largest)) or (0, h, 0, w)


def lung_box_8bit(
    u8: np.ndarray, margin: float = 0.05, min_lung_fraction: float = 0.01, min_box_fraction: float = 0.2
) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` lung box of a windowed 8-bit slice ``(y, x)`` (see the module docstring)."""
    from monai_covid.volume_detector import lung_mask_8bit

    a = np.asarray(u8, dtype=np.float32)
    h, w = a.shape
    by0, by1, bx0, bx1 = body_box_8bit(a)
    mask = lung_mask_8bit(a)
    box = _bbox(mask) if mask.mean() >= min_lung_fraction else None
    if box is None:
        y0, y1, x0, x1 = by0, by1, bx0, bx1
    else:
        y0, y1, x0, x1 = box
        c2 = bx0 + bx1  # twice the body's centre column
        x0, x1 = min(x0, c2 - x1), max(x1, c2 - x0)
        if (y1 - y0) * (x1 - x0) < min_box_fraction * h * w:
            y0, y1, x0, x1 = by0, by1, bx0, bx1
    dy, dx = margin * (y1 - y0), margin * (x1 - x0)
    y0, y1 = max(0, int(np.floor(y0 - dy))), min(h, int(np.ceil(y1 + dy)))
    x0, x1 = max(0, int(np.floor(x0 - dx))), min(w, int(np.ceil(x1 + dx)))
    if y1 - y0 < 8 or x1 - x0 < 8:
        return 0, h, 0, w
    return y0, y1, x0, x1


class LungCrop(Transform):
    """Array transform: channel-first 2D slice ``(C, H, W)`` -> the crop to its lung box (all channels alike).

    Args:
        scale: factor that brings the image to 8-bit grey levels for the lung mask (255 for an image already
            scaled to [0, 1], 1 for raw 8-bit values).
        margin: box margin, a fraction of the box size on each side.
    """

    backend = ["numpy", "torch"]

    def __init__(self, scale: float = 255.0, margin: float = 0.05) -> None:
        self.scale = scale
        self.margin = margin

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        arr, *_ = convert_data_type(img, np.ndarray)
        if arr.ndim != 3:
            raise ValueError(f"LungCrop expects a channel-first 2D image (C, H, W), got shape {arr.shape}")
        grey = np.clip(arr.mean(axis=0) * self.scale, 0, 255)
        y0, y1, x0, x1 = lung_box_8bit(grey, margin=self.margin)
        if isinstance(img, np.ndarray):
            return img[:, y0:y1, x0:x1]
        out, *_ = convert_to_dst_type(np.ascontiguousarray(arr[:, y0:y1, x0:x1]), dst=img)
        if isinstance(out, MetaTensor):
            # where the crop lies in the original image (y0, y1, x0, x1): heatmaps are pasted back there
            # (monai_covid.explain.unletterbox); a tensor so that it collates and decollates with the batch
            out.meta[BOX_KEY] = torch.tensor([y0, y1, x0, x1, arr.shape[1], arr.shape[2]])
        return out


class LungCropd(MapTransform):
    """Dictionary version of :class:`LungCrop`."""

    backend = LungCrop.backend

    def __init__(
        self, keys: KeysCollection, scale: float = 255.0, margin: float = 0.05, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.cropper = LungCrop(scale=scale, margin=margin)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.cropper(d[key])
        return d
