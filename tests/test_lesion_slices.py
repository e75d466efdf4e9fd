"""The shared CT lesion-slice pipeline (data_prep.lesion_slices) on real slices: scale, size, mask values, crops."""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import Compose
from PIL import Image

from data_prep.datalists import make_datalist
from data_prep.lesion_slices import load_transforms, train_augmentation


def _item(shared_data, i=0):
    return make_datalist("ct_lesion_slices", shared_data, fold=0, part="train")[i]


def test_load_transforms_real_slice(shared_data):
    item = _item(shared_data)
    raw = np.asarray(Image.open(item["image"]).convert("L"), dtype=np.float32)
    out = Compose(load_transforms((256, 256)))(dict(item))
    img, lab = out["image"], out["label"]
    assert tuple(img.shape) == (1, 256, 256) and img.dtype == torch.float32
    assert type(img) is torch.Tensor  # track_meta=False: plain tensors, no MetaTensor overhead in the cache
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    # resizing preserves the mean grey level of the slice (anti-aliased bilinear), on the /255 scale
    assert abs(float(img.mean()) - raw.mean() / 255.0) < 0.01
    assert set(torch.unique(lab).tolist()) <= {0.0, 1.0} and float(lab.sum()) > 0
    raw_mask = np.asarray(Image.open(item["label"]).convert("L")) > 127
    assert abs(float(lab.mean()) - raw_mask.mean()) < 0.01  # lesion fraction kept by the resize


def test_load_transforms_track_meta_keeps_file_name(shared_data):
    item = _item(shared_data, 2)
    out = Compose(load_transforms((128, 96), track_meta=True))(dict(item))
    assert tuple(out["image"].shape) == (1, 128, 96)
    assert out["image"].meta["filename_or_obj"] == item["image"]


def test_train_augmentation_crops_hit_lesion(shared_data):
    item = _item(shared_data)
    t = Compose(load_transforms((256, 256)) + train_augmentation((128, 128), crops_per_image=6))
    t.set_random_state(seed=3)
    crops = t(dict(item))
    assert len(crops) == 6
    for c in crops:
        assert tuple(c["image"].shape) == (1, 128, 128) and tuple(c["label"].shape) == (1, 128, 128)
        assert set(torch.unique(c["label"]).tolist()) <= {0.0, 1.0}
    # pos:neg = 1:1 centres, so lesion-centred crops contain lesion pixels
    assert sum(float(c["label"].sum()) > 0 for c in crops) >= 2
