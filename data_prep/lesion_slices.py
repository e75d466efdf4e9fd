"""Pre-processing and augmentation of the 8-bit CT lesion slices, shared by both CT lesion bundles.

``covid_ct_lesion_asegnet`` and ``covid_ct_lesion_cosup_resunet`` train on the same slices with the same transforms
(so their CV tables compare networks, not pipelines); their ``train.json`` build the transform lists here::

    "load_transforms": "$lesion_slices.load_transforms(@image_size)",
    "train": {"random_transforms": "$lesion_slices.train_augmentation(@crop_size, @crops_per_image)", ...}

Images are jpg/png display values (already lung-windowed); masks are 0/255 png. ``monai_covid.inference.lesion.
segment_slices`` applies the same scaling and resizing at inference.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Hashable, Mapping
from typing import Any, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    AsDiscreted,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resized,
    ScaleIntensityRanged,
)
from monai.transforms.transform import MapTransform, Transform

__all__ = [
    "load_transforms",
    "train_augmentation",
    "GreyLevelMap",
    "GreyLevelMapd",
    "grey_percentiles",
    "volume_grey_maps",
    "MATCH_PERCENTILES",
]

KEYS = ("image", "label")


def _grey(image):
    """PIL image -> single-channel ``L`` (colour jpgs and palette pngs alike)."""
    return image.convert("L")


class GreyLevelMap(Transform):
    """``x -> clip(scale * x + offset, 0, 1)``: a linear re-windowing of an image already scaled to [0, 1].

    Used to bring the pseudo-labelled slices of a volume exported with another display window onto the grey scale of
    the doctor-labelled slices (:func:`volume_grey_maps`). ``scale=1, offset=0`` is the identity."""

    def __init__(self, scale: float = 1.0, offset: float = 0.0) -> None:
        self.scale, self.offset = float(scale), float(offset)

    def __call__(self, img: Any, scale: float | None = None, offset: float | None = None) -> Any:
        a = self.scale if scale is None else float(scale)
        b = self.offset if offset is None else float(offset)
        if a == 1.0 and b == 0.0:
            return img
        out = img * a + b
        return out.clamp(0.0, 1.0) if isinstance(out, torch.Tensor) else np.clip(out, 0.0, 1.0)


class GreyLevelMapd(MapTransform):
    """Dictionary version of :class:`GreyLevelMap`; the ``(scale, offset)`` pair of each item comes from its
    ``map_key`` entry (set per volume by ``ct_lesion_pseudo_datalist(..., rewindow=True)``). Items without it
    (the doctor slices, inference inputs) pass unchanged."""

    def __init__(self, keys: KeysCollection, map_key: str = "grey_map", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.map_key = map_key
        self.mapper = GreyLevelMap()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        pair = d.get(self.map_key)
        if pair is None:
            return d
        scale, offset = (float(v) for v in pair)
        for key in self.key_iterator(d):
            d[key] = self.mapper(d[key], scale, offset)
        return d


#: grey-value percentiles matched by :func:`volume_grey_maps`: the middle of the distribution, below the doctor
#: slices' saturation (their 95th-99th percentiles are 247-255, clipped by the display window)
MATCH_PERCENTILES: tuple[float, ...] = (10.0, 25.0, 40.0, 50.0, 60.0, 75.0)


def grey_percentiles(paths: Sequence[str | os.PathLike], q: Sequence[float] = MATCH_PERCENTILES) -> np.ndarray:
    """The percentiles ``q`` of the grey values (0-255) pooled over the images ``paths``."""
    from PIL import Image

    values = []
    for path in paths:
        with Image.open(path) as im:
            values.append(np.asarray(_grey(im), dtype=np.float32).ravel())
    return np.percentile(np.concatenate(values), list(q))


@functools.lru_cache(maxsize=4)
def _reference(data_dir: str, q: tuple[float, ...] = MATCH_PERCENTILES) -> np.ndarray:
    from pathlib import Path

    images = sorted(p for p in (Path(data_dir) / "ct_lesion_slices" / "train" / "images").iterdir() if p.is_file())
    return grey_percentiles(images, q)


def volume_grey_maps(
    items: Sequence[Mapping[str, Any]],
    data_dir: str | os.PathLike,
    q: Sequence[float] = MATCH_PERCENTILES,
    every: int = 4,
) -> dict[str, tuple[float, float]]:
    """Per ``volume`` of ``items`` the ``(scale, offset)`` (for images in [0, 1]) of the least-squares line that
    maps the volume's pooled grey percentiles ``q`` (every ``every``-th slice) onto those of the 50 doctor-labelled
    slices (``ct_lesion_slices/train/images``; grey values only, no masks).

    The pseudo-labelled set mixes two display windows: coronacases.org slices are exported with about twice the
    window width (median grey ~60, 75th percentile ~95 of 255; the fit gives scale ~2), Radiopaedia's match the doctor
    slices (scale 0.9-1.1); a network pre-trained on the former learns a grey scale no input has at inference."""
    ref = _reference(str(data_dir), tuple(float(v) for v in q))
    by_volume: dict[str, list[str]] = {}
    for d in items:
        by_volume.setdefault(str(d["volume"]), []).append(str(d["image"]))
    maps = {}
    for volume, paths in sorted(by_volume.items()):
        src = grey_percentiles(sorted(paths)[:: max(int(every), 1)], q)
        scale, offset = np.linalg.lstsq(np.stack([src, np.ones_like(src)], 1), ref, rcond=None)[0]
        maps[volume] = (float(scale), float(offset) / 255.0)
    return maps


def load_transforms(image_size: Sequence[int] = (256, 256), track_meta: bool = False, soft_label: bool = False) -> list:
    """Deterministic part: read slice and mask as grey, scale both to [0, 1], resize to ``image_size`` (bilinear,
    anti-aliased; the mask thresholded at 0.5 afterwards), float32. ``track_meta=True`` keeps the file names
    (the evaluation writes per-image metrics).

    ``soft_label=True`` keeps the mask as a probability in [0, 1] (the pseudo-labels' soft masks, stored as
    probability x 255) instead of thresholding it; the default threshold 0.5 is the pseudo-label README's 128 of
    255 (128 / 255 = 0.502 is kept, 127 / 255 is not)."""
    keys = list(KEYS)
    binarize = [] if soft_label else [AsDiscreted("label", threshold=0.5)]
    return [
        LoadImaged(keys, reader="PILReader", reverse_indexing=False, converter=_grey, image_only=True),
        EnsureChannelFirstd(keys, channel_dim="no_channel"),
        ScaleIntensityRanged(keys, a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0),
        GreyLevelMapd("image"),  # per-volume re-windowing of pseudo-labelled slices; others pass unchanged
        Resized("image", spatial_size=tuple(image_size), mode="bilinear", anti_aliasing=True),
        Resized("label", spatial_size=tuple(image_size), mode="bilinear", anti_aliasing=True),
        *binarize,
        EnsureTyped(keys, dtype=torch.float32, track_meta=track_meta),
    ]


def train_augmentation(crop_size: Sequence[int] = (128, 128), crops_per_image: int = 1) -> list:
    """Random part: left-right (p 0.5) and up-down (p 0.2) flips, affine (p 0.7: ±15°, ±15 % zoom, ±16 px shift),
    contrast gamma 0.7–1.5, intensity scale ±15 % and shift ±0.08, Gaussian noise (σ 0.02, p 0.2), then
    ``crops_per_image`` crops of ``crop_size`` centred on lesion and background 1:1."""
    keys = list(KEYS)
    return [
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandFlipd(keys, prob=0.2, spatial_axis=0),
        RandAffined(
            keys,
            prob=0.7,
            rotate_range=0.26,
            scale_range=(0.15, 0.15),
            translate_range=(16, 16),
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
        ),
        RandAdjustContrastd("image", prob=0.5, gamma=(0.7, 1.5)),
        RandScaleIntensityd("image", prob=0.5, factors=0.15),
        RandShiftIntensityd("image", prob=0.5, offsets=0.08),
        RandGaussianNoised("image", prob=0.2, std=0.02),
        RandCropByPosNegLabeld(
            keys, label_key="label", spatial_size=tuple(crop_size), pos=1, neg=1, num_samples=crops_per_image
        ),
    ]
