"""Near-duplicate groups and grouped 5-fold splits of the chest X-ray infection set (``cxr_infection_grouped``)."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.datalists import CXR_NCC_THRESHOLD, cxr_infection_grouped_datalist, make_datalist


def _xray(rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """A chest-X-ray-like picture: bright background, two dark 'lungs' at random places, random smooth blobs."""
    yy, xx = np.mgrid[:size, :size] / size
    img = np.full((size, size), 180.0)
    for cx in (0.3 + rng.uniform(-0.1, 0.1), 0.7 + rng.uniform(-0.1, 0.1)):
        img -= 110 * np.exp(-(((xx - cx) / rng.uniform(0.08, 0.2)) ** 2 + ((yy - rng.uniform(0.3, 0.6)) / 0.25) ** 2))
    for _ in range(8):
        bx, by, r = rng.uniform(0, 1, 2).tolist() + [rng.uniform(0.03, 0.12)]
        img += rng.uniform(-90, 90) * np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / r**2)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_set(root: Path, images: dict[str, list[np.ndarray]]) -> None:
    for cls, arrays in images.items():
        for sub in ("images", "infection_masks", "lung_masks"):
            (root / "cxr_infection" / "train" / cls / sub).mkdir(parents=True, exist_ok=True)
        for i, arr in enumerate(arrays):
            name = f"{cls}_{i}.png"
            Image.fromarray(arr).save(root / "cxr_infection" / "train" / cls / "images" / name)
            empty = np.zeros_like(arr)
            Image.fromarray(empty).save(root / "cxr_infection" / "train" / cls / "infection_masks" / name)
            Image.fromarray(empty).save(root / "cxr_infection" / "train" / cls / "lung_masks" / name)


def _assert_groups_within_one_fold(items) -> None:
    folds_of = collections.defaultdict(set)
    for d in items:
        folds_of[d["group"]].add(d["fold"])
    assert all(len(f) == 1 for f in folds_of.values()), {g: f for g, f in folds_of.items() if len(f) > 1}


def test_synthetic_near_duplicate_pair_shares_group_and_fold(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    covid = [_xray(rng) for _ in range(8)]
    # a contrast-changed, noisy copy of covid_0 (the same X-ray exported twice)
    dup = np.clip(covid[0].astype(float) * 0.85 + 20 + rng.normal(0, 3, covid[0].shape), 0, 255).astype(np.uint8)
    _write_set(
        tmp_path,
        {"covid": covid + [dup], "non_covid": [_xray(rng) for _ in range(5)], "normal": [_xray(rng) for _ in range(5)]},
    )
    items = cxr_infection_grouped_datalist(tmp_path, n_folds=5)
    by_name = {Path(d["image"]).name: d for d in items}
    assert len(items) == 19
    assert by_name["covid_0.png"]["group"] == by_name["covid_8.png"]["group"]
    assert by_name["covid_0.png"]["fold"] == by_name["covid_8.png"]["fold"]
    # the other synthetic X-rays are different pictures: each its own group
    assert len({d["group"] for d in items}) == 18
    _assert_groups_within_one_fold(items)
    # every fold holds some X-rays, COVID spread over all five folds
    assert {d["fold"] for d in items if d["covid"]} == set(range(5))
    # a threshold above the pair's correlation keeps them apart
    apart = {Path(d["image"]).name: d["group"] for d in cxr_infection_grouped_datalist(tmp_path, threshold=0.99999)}
    assert apart["covid_0.png"] != apart["covid_8.png"]


def test_real_grouped_folds(shared_data: Path) -> None:
    items = make_datalist("cxr_infection_grouped", shared_data)
    assert len(items) == 3060 and len({d["image"] for d in items}) == 3060
    _assert_groups_within_one_fold(items)
    groups = collections.Counter(d["group"] for d in items)
    assert 2500 < len(groups) < 3060  # some near-duplicates exist, most X-rays stand alone
    by_name = {d["image"].split("/")[-1]: d for d in items}
    # two of the COVID X-rays with the highest thumbnail correlation in the set (NCC 0.998 and 0.996)
    for a, b in (("covid_667.png", "covid_4020.png"), ("covid_804.png", "covid_3977.png")):
        assert by_name[a]["group"] == by_name[b]["group"]
    # classes balanced over the folds as far as the groups allow
    counts = collections.Counter((d["fold"], d["class_name"]) for d in items)
    for cls, total in (("covid", 1828), ("non_covid", 932), ("normal", 300)):
        per_fold = [counts[(f, cls)] for f in range(5)]
        assert sum(per_fold) == total
        assert max(per_fold) - min(per_fold) <= max(2, total // 50), (cls, per_fold)
    # fold parts of the config entry point agree with the full list
    val1 = make_datalist("cxr_infection_grouped", shared_data, fold=1, part="val")
    train1 = make_datalist("cxr_infection_grouped", shared_data, fold=1, part="train")
    assert len(val1) + len(train1) == 3060
    assert not {d["group"] for d in val1} & {d["group"] for d in train1}
    assert 0.9 < CXR_NCC_THRESHOLD < 1.0


def test_threshold_table_counts_pairs_and_groups() -> None:
    from data_prep.cxr_grouping_report import threshold_table

    # 4 X-rays: two COVID near-duplicates (0.97), one COVID-normal pair at 0.93 (different patients by class)
    scores = np.eye(4)
    scores[0, 1] = scores[1, 0] = 0.97
    scores[1, 2] = scores[2, 1] = 0.93
    scores[2, 3] = scores[3, 2] = 0.5
    rows = threshold_table(scores, ["covid", "covid", "normal", "normal"], [0.92, 0.95])
    low, high = rows
    assert low["different_pairs"] == 4 and low["different_pairs_at_or_above"] == 1
    assert low["covid_pairs_at_or_above"] == 1 and low["covid_chance"] == pytest.approx(0.25)
    assert (low["groups"], low["largest"], low["mixed_class_groups"]) == (2, 3, 1)
    assert high["different_pairs_at_or_above"] == 0 and (high["groups"], high["largest"]) == (3, 2)
