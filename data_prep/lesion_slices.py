"""Pre-processing and augmentation of the 8-bit CT lesion slices, shared by both CT lesion bundles.

``covid_ct_lesion_asegnet`` and ``covid_ct_lesion_cosup_resunet`` train on the same slices with the same transforms
(so their CV tables compare networks, not pipelines); their ``train.json`` build the transform lists here::

    "load_transforms": "$lesion_slices.load_transforms(@image_size)",
    "train": {"random_transforms": "$lesion_slices.train_augmentation(@crop_size, @crops_per_image)", ...}

Images are jpg/png display values (already lung-windowed); masks are 0/255 png. ``monai_covid.inference.lesion.
segment_slices`` applies the same scaling and resizing at inference.
"""

from __future__ import annotations

from typing import Sequence

import torch
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

__all__ = ["load_transforms", "train_augmentation"]

KEYS = ("image", "label")


def _grey(image):
    """PIL image -> single-channel ``L`` (colour jpgs and palette pngs alike)."""
    return image.convert("L")


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
