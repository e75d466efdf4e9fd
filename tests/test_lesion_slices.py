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


def test_grey_level_map_array_and_dict() -> None:
    from data_prep.lesion_slices import GreyLevelMap, GreyLevelMapd

    x = torch.linspace(0, 1, 11)[None]
    y = GreyLevelMap(2.0, -0.5)(x)
    assert torch.allclose(y, (2 * x - 0.5).clamp(0, 1)) and float(y.min()) == 0.0 and float(y.max()) == 1.0
    assert np.allclose(GreyLevelMap(0.5, 0.1)(x.numpy()), 0.5 * x.numpy() + 0.1)
    assert GreyLevelMap()(x) is x  # identity
    d = GreyLevelMapd("image")
    assert torch.equal(d({"image": x})["image"], x)  # no grey_map: unchanged (doctor slices, inference)
    assert torch.allclose(d({"image": x, "grey_map": [2.0, -0.5]})["image"], y)


def test_pseudo_volumes_rewindowed_onto_the_doctor_grey_scale(shared_data) -> None:
    """coronacases.org pseudo slices are exported with a wider window (darker); the per-volume map brings each
    volume's middle grey percentiles onto the doctor slices' and leaves Radiopaedia's nearly as they are."""
    from data_prep.lesion_slices import MATCH_PERCENTILES, _reference, grey_percentiles

    items = make_datalist("ct_lesion_pseudo", shared_data, part="all", rewindow=True)
    ref = _reference(str(shared_data), MATCH_PERCENTILES)
    by_volume: dict = {}
    for d in items:
        by_volume.setdefault(d["volume"], []).append(d)
    for volume, vol_items in by_volume.items():
        assert len({tuple(d["grey_map"]) for d in vol_items}) == 1  # one map a volume
    scales = {v: its[0]["grey_map"][0] for v, its in by_volume.items()}
    corona = [s for v, s in scales.items() if "coronacases" in v]
    radio = [s for v, s in scales.items() if "radiopaedia" in v]
    assert corona and radio and min(corona) > 1.4 and all(0.7 < s < 1.3 for s in radio)
    # one coronacases volume through the real pipeline: its middle percentiles move onto the reference's
    vol = next(v for v in by_volume if "coronacases" in v)
    sample = by_volume[vol][::4]
    mapped = np.concatenate(
        [Compose(load_transforms((256, 256), soft_label=True))(dict(d))["image"].numpy().ravel() for d in sample]
    )
    after = np.abs(np.percentile(255 * mapped, MATCH_PERCENTILES) - ref).mean()
    before = np.abs(grey_percentiles([d["image"] for d in sample]) - ref).mean()
    assert after < before / 3 and after < 25, (before, after)
    assert "grey_map" not in make_datalist("ct_lesion_pseudo", shared_data, part="all")[0]  # off by default


def test_bundle_threshold_reaches_infer_and_the_bundle_inferer(shared_data, tmp_path, monkeypatch):
    """The lesion bundle's ``inference.json`` key ``threshold`` is the cut `monai-covid infer` (and MONAI Label,
    through ``ModelSet``) and the bundle's ``LesionInferer`` apply: on real doctor slices (of one size) turned back into HU,
    a copy of the bundle with threshold 0.99 marks fewer voxels than one with 0.3, and exactly the voxels of
    ``segment_volume`` at that threshold."""
    import json
    import shutil
    from pathlib import Path

    from monai.bundle import ConfigParser

    from data_prep.intensity import HUWindow
    from monai_covid.batch import ModelSet
    from monai_covid.inference.lesion import HU_WINDOW, LesionInferer, load_bundle_network, segment_volume

    repo = Path(__file__).resolve().parents[1]
    slices = [
        np.asarray(Image.open(i["image"]).convert("L"), dtype=np.float32) / 255.0
        for i in make_datalist("ct_lesion_slices", shared_data, fold=0, part="val")
    ]
    grey = np.stack([s for s in slices if s.shape == slices[0].shape][:3])  # slices of one size make a volume
    lo, hi = HU_WINDOW
    hu = grey * (hi - lo) + lo  # the inverse of the bundle's HU window
    assert np.allclose(np.asarray(HUWindow(lo, hi)(torch.from_numpy(hu))), grey, atol=1e-5)
    lung = np.ones(hu.shape, bool)
    counts = {}
    for thr in (0.3, 0.99):
        root = tmp_path / str(thr)
        dst = root / "covid_ct_lesion_asegnet"
        shutil.copytree(repo / "bundles" / "covid_ct_lesion_asegnet", dst, ignore=shutil.ignore_patterns("docs"))
        cfg = json.loads((dst / "configs" / "inference.json").read_text())
        cfg["threshold"] = thr
        (dst / "configs" / "inference.json").write_text(json.dumps(cfg))
        monkeypatch.setenv("MONAI_COVID_BUNDLES", str(root))
        mask = ModelSet(["asegnet"], device="cpu").segment_lesions(hu, lung)
        net = load_bundle_network(dst, "cpu")
        assert np.array_equal(mask, segment_volume(net, hu, lung, threshold=thr))
        parser = ConfigParser()
        parser.read_config(str(dst / "configs" / "inference.json"))
        inferer = parser.get_parsed_content("inferer")
        assert isinstance(inferer, LesionInferer) and inferer.threshold == thr
        counts[thr] = int(mask.sum())
    assert 0 < counts[0.99] < counts[0.3]
