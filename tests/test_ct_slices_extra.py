"""Second training source of the CT slice classifier (issue 20): ``data_prep.datalists.ct_slices_extra_datalist``.

Real data from ``../shared/data``: which slices, which labels, the lung-window renders of the DICOM series (checked
against pydicom's own decoding), that nothing is written into the data folder, that no added image is a
near-duplicate of an evaluation image (UCSD val, SARS-CoV-2), and that ``train.json`` adds the items to the training
fold only.
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_prep import datalists as dl
from data_prep import near_duplicates as nd

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "covid_ct_slice_ctnet"


@pytest.fixture(scope="module")
def extra(shared_data, tmp_path_factory):
    cache = tmp_path_factory.mktemp("extra_cache")
    return cache, dl.ct_slices_extra_datalist(shared_data, cache_dir=cache)


def test_slices_labels_and_groups(extra, shared_data):
    cache, items = extra
    kinds = Counter((d["group"].split(":")[0], d["label"]) for d in items)
    assert kinds == {("medseg", 1): 50, ("pseudo", 1): 80, ("ctmd", 1): 80, ("ctmd", 0): 222}
    pseudo_groups = Counter(d["group"] for d in items if d["group"].startswith("pseudo:"))
    assert len(pseudo_groups) == 20 and set(pseudo_groups.values()) == {4}
    assert {d["group"] for d in items if d["label"] == 0} == {"ctmd:P001", "ctmd:normal001"}
    # normal001 is a normal series: none of its slices may be a COVID-19 example
    assert all(d["label"] == 0 for d in items if d["group"] == "ctmd:normal001")
    assert {d["fold"] for d in items} == {-1}
    # the same keys as the SARS-CoV-2 items, so that both lists batch together
    sars = dl.ct_slices_cls_grouped_datalist(shared_data)
    assert {frozenset(d) for d in items} == {frozenset(sars[0])}
    assert all(Path(d["image"]).is_file() for d in items)
    rendered = [Path(d["image"]) for d in items if d["group"].startswith("ctmd:")]
    assert all(cache in p.parents for p in rendered)
    assert not any(Path(shared_data).resolve() in p.resolve().parents for p in rendered)


def test_pseudo_slices_spread_over_the_volume(extra, shared_data):
    _, items = extra
    picked = [Path(d["image"]).name for d in items if d["group"].startswith("pseudo:")]
    vol = dl.pseudo_label_volume(picked[0])
    all_idx = sorted(
        int(p.stem.rsplit("_", 1)[1])
        for p in (Path(shared_data) / "ct_lesion_slices" / "pseudo_labelled" / "images").iterdir()
        if dl.pseudo_label_volume(p.name) == vol
    )
    got = sorted(int(Path(n).stem.rsplit("_", 1)[1]) for n in picked if dl.pseudo_label_volume(n) == vol)
    assert len(got) == 4 and got[0] > all_idx[0] and got[-1] < all_idx[-1]  # evenly spaced, not the first four


def test_render_is_the_lung_window_of_the_dicom_values(extra, shared_data):
    pydicom = pytest.importorskip("pydicom")
    from PIL import Image

    cache, items = extra
    lo, hi = dl.CT_DISPLAY_WINDOW
    series = Path(shared_data) / "ct_dicom" / "P001"
    p001 = next(d for d in dl.ct_dicom_datalist(shared_data) if d["series_id"] == "P001")
    labels = {int(k): v for k, v in p001["slice_labels"].items()}
    by_inst = {}
    for f in sorted(series.glob("*.dcm"))[:40]:
        ds = pydicom.dcmread(f)
        by_inst[int(ds.InstanceNumber)] = ds
    checked = 0
    for d in items:
        if d["group"] != "ctmd:P001":
            continue
        inst = int(Path(d["image"]).stem)
        assert d["label"] == labels.get(inst, 0)
        if inst not in by_inst:
            continue
        ds = by_inst[inst]
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        want = np.round(np.clip((hu - lo) / (hi - lo), 0, 1) * 255)
        got = np.asarray(Image.open(d["image"]), dtype=np.float32)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1
        checked += 1
    assert checked >= 10


def test_renders_are_reused(extra, shared_data):
    cache, items = extra
    png = next(Path(d["image"]) for d in items if d["group"] == "ctmd:normal001")
    before = png.stat().st_mtime_ns
    again = dl.ct_slices_extra_datalist(shared_data, cache_dir=cache)
    assert [d["image"] for d in again] == [d["image"] for d in items]
    assert png.stat().st_mtime_ns == before
    assert not [p for p in png.parent.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_no_added_image_is_a_near_duplicate_of_an_evaluation_image(extra, shared_data):
    _, items = extra

    def unit(thumbs):
        x = thumbs.reshape(len(thumbs), -1).astype(np.float64)
        x -= x.mean(axis=1, keepdims=True)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    added = unit(nd.thumbnails([d["image"] for d in items]))
    for evaluation in (dl.ct_slices_ucsd_datalist(shared_data), dl.ct_slices_cls_grouped_datalist(shared_data)):
        r = added @ unit(nd.thumbnails([d["image"] for d in evaluation])).T
        assert r.max() < nd.DEFAULT_NCC_THRESHOLD, r.max()


def test_train_json_adds_them_to_the_training_fold_only(extra, shared_data, monkeypatch):
    from monai.bundle import ConfigParser

    cache, _ = extra
    monkeypatch.setattr(dl, "ct_slices_extra_datalist", functools.partial(dl.ct_slices_extra_datalist, cache_dir=cache))
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser.update({"bundle_root": str(BUNDLE), "dataset_dir": str(shared_data), "val_fold": 2})
    base_train = parser.get_parsed_content("train_datalist")
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser.update({"bundle_root": str(BUNDLE), "dataset_dir": str(shared_data), "val_fold": 2, "extra_source": True})
    train, val = parser.get_parsed_content("train_datalist"), parser.get_parsed_content("val_datalist")
    assert len(train) == len(base_train) + 432
    assert {d["fold"] for d in val} == {2}
    assert not {d["image"] for d in val} & {d["image"] for d in train}

