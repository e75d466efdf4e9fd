"""Datalists: deterministic, disjoint folds; groups never split; MONAI can read them."""

from __future__ import annotations

from pathlib import Path

import pytest
from monai.data import load_decathlon_datalist

from data_prep.datalists import (
    ct_dicom_datalist,
    ct_lesion_datalist,
    ct_slices_cls_datalist,
    cxr_infection_datalist,
    make_datalist,
    oversample,
    split_by_fold,
    write_datalist,
)


@pytest.mark.parametrize(
    "builder, n, label_key",
    [(ct_lesion_datalist, 50, "label"), (cxr_infection_datalist, 3060, "label"), (ct_slices_cls_datalist, 300, "label")],
)
def test_folds_disjoint_and_deterministic(shared_data, builder, n, label_key):
    a, b = builder(shared_data), builder(shared_data)
    assert a == b and len(a) == n
    assert {d["fold"] for d in a} == set(range(5))
    images = [d["image"] for d in a]
    assert len(set(images)) == n and all(Path(p).is_file() for p in images)
    for fold in range(5):
        train, val = split_by_fold(a, fold)
        assert not {d["image"] for d in train} & {d["image"] for d in val}
        assert len(train) + len(val) == n and 0.15 * n <= len(val) <= 0.25 * n


def test_class_stratification(shared_data):
    items = ct_slices_cls_datalist(shared_data)
    for fold in range(5):
        val = [d["label"] for d in items if d["fold"] == fold]
        assert sum(val) == len(val) // 2
    cxr = cxr_infection_datalist(shared_data)
    assert sum(d["covid"] for d in cxr if d["fold"] == 0) == 366  # 1,828 COVID X-rays (data version 2) over 5 folds


def test_lesion_folds_are_contiguous_blocks(shared_data):
    items = ct_lesion_datalist(shared_data)
    ids = [int(Path(d["image"]).stem) for d in items]
    for f in range(4):
        assert max(i for i, d in zip(ids, items) if d["fold"] == f) < min(i for i, d in zip(ids, items) if d["fold"] == f + 1)


def test_ct_dicom_groups_by_series(shared_data):
    items = ct_dicom_datalist(shared_data)
    assert [(d["series_id"], d["label"]) for d in items] == [("P001", 1), ("normal001", 0)]
    assert len({d["fold"] for d in items}) == 2
    assert sum(items[0]["slice_labels"].values()) == 80 and len(items[0]["slice_labels"]) == 148


def test_written_datalist_loads_in_monai(shared_data, tmp_path):
    items = make_datalist("ct_lesion_slices", shared_data)
    path = write_datalist(items, tmp_path / "ct_lesion.json")
    loaded = load_decathlon_datalist(str(path), data_list_key="training")
    assert len(loaded) == 50 and loaded[0]["image"] == items[0]["image"]
    val = make_datalist("ct_lesion_slices", shared_data, fold=2, part="val")
    assert {d["fold"] for d in val} == {2}
    with pytest.raises(ValueError):
        make_datalist("nope", shared_data)


def test_oversample_repeats_by_class(shared_data):
    train = make_datalist("cxr_infection", shared_data, fold=0, part="train")
    counts = {c: sum(d["class_name"] == c for d in train) for c in ("covid", "non_covid", "normal")}
    assert counts == {"covid": 1462, "non_covid": 745, "normal": 240}  # data version 2, 4 of 5 folds
    out = oversample(train, "class_name", {"non_covid": 3, "normal": 0})
    assert len(out) == 1462 + 3 * 745
    assert sum(d["class_name"] == "non_covid" for d in out) == 3 * 745 and all(d["class_name"] != "normal" for d in out)
    assert {d["image"] for d in out if d["class_name"] == "non_covid"} == {
        d["image"] for d in train if d["class_name"] == "non_covid"
    }
    with pytest.raises(ValueError, match="whole numbers"):
        oversample(train, "class_name", {"covid": 1.5})
