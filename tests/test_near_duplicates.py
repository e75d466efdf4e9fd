"""Near-duplicate grouping (data_prep.near_duplicates) and the grouped folds of the CT slice sets."""

from __future__ import annotations

import collections
import io

import numpy as np
import pytest
from PIL import Image

from data_prep import near_duplicates as nd
from data_prep.datalists import ct_slices_cls_grouped_datalist, ct_slices_ucsd_datalist, make_datalist


def _phantom(rng: np.random.Generator, h: int = 180, w: int = 240) -> np.ndarray:
    """A CT-like slice: a dark body ellipse with two darker 'lungs' and random blobs, uint8."""
    yy, xx = np.mgrid[:h, :w]
    img = np.full((h, w), 10.0)
    cy, cx = h / 2 + rng.uniform(-10, 10), w / 2 + rng.uniform(-10, 10)
    ry, rx = rng.uniform(0.3, 0.45) * h, rng.uniform(0.3, 0.45) * w
    img[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = 200
    for sx in (-0.45, 0.45):
        img[((yy - cy) / (0.7 * ry)) ** 2 + ((xx - cx - sx * rx) / (0.35 * rx)) ** 2 < 1] = 60
    for _ in range(6):
        by, bx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(5, 20)
        img[(yy - by) ** 2 + (xx - bx) ** 2 < r * r] = rng.uniform(0, 255)
    return img.astype(np.uint8)


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())))


def test_synthetic_near_duplicates_grouped_and_distinct_slices_apart() -> None:
    rng = np.random.default_rng(0)
    bases = [_phantom(rng) for _ in range(4)]
    images, truth = [], []
    for k, b in enumerate(bases):
        noisy = np.clip(b + rng.normal(0, 8, b.shape), 0, 255).astype(np.uint8)
        shifted = np.roll(b, 2, axis=1)
        variants = [b, noisy, shifted, _jpeg(b, 30), np.stack([b, b, b], -1)]  # RGB copy too
        images += variants
        truth += [k] * len(variants)
    scores = nd.pair_scores(np.stack([nd.thumbnail(i) for i in images]))
    groups = nd.group_near_duplicates(scores, nd.DEFAULT_NCC_THRESHOLD)
    # same base image -> same group; different bases -> different groups
    for i in range(len(images)):
        for j in range(len(images)):
            assert (groups[i] == groups[j]) == (truth[i] == truth[j]), (i, j, scores[i, j])
    assert nd.describe_groups(groups, truth) == {
        "items": 20, "groups": 4, "singletons": 0, "largest": 5, "sizes_top10": [5, 5, 5, 5], "mixed_class_groups": 0
    }


def test_union_find_is_transitive() -> None:
    s = np.eye(5)
    s[0, 1] = s[1, 0] = 0.95  # 0-1 and 1-2 similar, 0-2 not: single linkage joins all three
    s[1, 2] = s[2, 1] = 0.95
    assert nd.group_near_duplicates(s, 0.9) == [0, 0, 0, 1, 2]
    with pytest.raises(ValueError):
        nd.group_near_duplicates(np.zeros((2, 3)))


def test_ncc_and_phash_scores() -> None:
    rng = np.random.default_rng(1)
    a, b = _phantom(rng), _phantom(rng)
    t = np.stack([nd.thumbnail(a), nd.thumbnail(255 - a), nd.thumbnail(b), nd.thumbnail(np.zeros((30, 30)))])
    r = nd.ncc_matrix(t)
    assert r[0, 0] == pytest.approx(1.0) and r[0, 1] == pytest.approx(-1.0, abs=1e-6)  # inverted image
    assert r[0, 2] < 0.9 and r[0, 3] == 0.0  # another slice; a constant image correlates with nothing
    h = nd.phash_similarity(t[:3])
    assert h[0, 0] == 1.0 and h[0, 1] < 0.1 and np.allclose(h, h.T)


def test_grouped_folds_balance_classes_and_keep_groups_whole() -> None:
    rng = np.random.default_rng(2)
    groups, labels = [], []
    for g in range(60):
        size, label = int(rng.integers(1, 8)), g % 2
        groups += [f"g{g}"] * size
        labels += [label] * size
    folds = nd.grouped_folds(groups, labels, n_folds=5)
    where = collections.defaultdict(set)
    for g, f in zip(groups, folds):
        where[g].add(f)
    assert all(len(v) == 1 for v in where.values())
    counts = collections.Counter(zip(folds, labels))
    for c in (0, 1):
        per_fold = [counts[(f, c)] for f in range(5)]
        assert max(per_fold) - min(per_fold) <= 7  # at most one group (<= 7 items) apart
    assert nd.grouped_folds(groups, labels) == folds  # deterministic
    with pytest.raises(ValueError):
        nd.grouped_folds(["a", "b"], [0, 1], n_folds=5)


def test_real_sars_cov2_grouped_folds(shared_data) -> None:
    items = ct_slices_cls_grouped_datalist(shared_data)
    assert len(items) == 300
    where = collections.defaultdict(set)
    for d in items:
        where[d["group"]].add(d["fold"])
    assert all(len(f) == 1 for f in where.values()), "a near-duplicate group is split over folds"
    info = nd.describe_groups([d["group"] for d in items], [d["label"] for d in items])
    assert 100 <= info["groups"] < 200 and info["largest"] <= 60  # many slices have look-alikes; no giant group
    counts = collections.Counter((d["fold"], d["label"]) for d in items)
    assert all(abs(counts[(f, c)] - 30) <= 3 for f in range(5) for c in (0, 1))
    # the config-facing entry point gives the same folds
    assert make_datalist("ct_slices_cls_grouped", shared_data, fold=0, part="val") == [d for d in items if d["fold"] == 0]


def test_real_near_duplicates_are_file_neighbours(shared_data) -> None:
    """Pairs joined at the threshold are mostly consecutive source files (slices of one scan), a check that does
    not use the images: the SARS-CoV-2 files are numbered scan by scan."""
    import re

    items = ct_slices_cls_grouped_datalist(shared_data)
    num = np.array([int(re.search(r"\((\d+)\)", d["image"]).group(1)) for d in items])
    cls = np.array([d["label"] for d in items])
    s = nd.ncc_matrix(nd.thumbnails([d["image"] for d in items]))
    iu = np.triu_indices(len(items), 1)
    same = (cls[:, None] == cls[None, :])[iu]
    close = (np.abs(num[:, None] - num[None, :]) <= 30)[iu]
    joined = (s[iu] >= nd.DEFAULT_NCC_THRESHOLD) & same
    assert close[joined].mean() > 0.9 > 2 * close[same].mean()


def test_ucsd_datalist_keeps_patient_ids(shared_data) -> None:
    items = ct_slices_ucsd_datalist(shared_data)
    assert len(items) == 116 and sum(d["label"] for d in items) == 60
    assert len({d["group"] for d in items}) == 55
    assert {p.rsplit(".", 1)[-1].lower() for p in (d["image"] for d in items)} == {"png", "jpg"}
