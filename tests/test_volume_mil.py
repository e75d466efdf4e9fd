"""ResNeXt+ training scheme (monai_covid.volume_mil): slice table on real slices, grouped folds (no volume in two
folds), MIL bags built only from training rows, the 5 % false-positive threshold rule and the CIs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_covid import volume_mil as vm
from monai_covid.volume_detector import binary_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def _table(groups: list[tuple[str, int, int, bool]], size: int = 8) -> vm.SliceTable:
    """Synthetic table: (group, n slices, slice label, ordered volume?)."""
    label, group, order, vol = [], [], [], {}
    for g, n, y, ordered in groups:
        label += [y] * n
        group += [g] * n
        order += list(range(n)) if ordered else [-1] * n
        if ordered:
            vol[g] = int(y != 0)
    n = len(label)
    x = torch.arange(n, dtype=torch.float16)[:, None, None, None].expand(n, 2, size, size).clone()
    return vm.SliceTable(x, label, label, group, ["s"] * n, order, vol)


@pytest.fixture(scope="module")
def real_table(shared_data):
    """A small real table: the first 110 pseudo-labelled slices (two COVID-19 volumes) and 16 UCSD slices."""
    return vm.build_slice_table(shared_data, size=32, sources=("pseudo", "ucsd"), limit={"pseudo": 110, "ucsd": 16}, verbose=False)


def test_pseudo_volume_id() -> None:
    assert vm.pseudo_volume_id("Data-1_coronacases_org_001_47.jpg") == ("Data-1_coronacases_org_001", 47)
    name = "Data-1_radiopaedia_org_covid-19-pneumonia-10_85902_3-dcm_155.jpg"
    assert vm.pseudo_volume_id(name) == ("Data-1_radiopaedia_org_covid-19-pneumonia-10_85902_3-dcm", 155)
    with pytest.raises(ValueError):
        vm.pseudo_volume_id("noslice.jpg")


def test_real_table_groups_and_ranges(real_table: vm.SliceTable) -> None:
    t = real_table
    assert t.x.shape[1:] == (2, 32, 32) and t.x.dtype == torch.float16
    assert 0 <= float(t.x[:, 0].min()) and float(t.x[:, 0].max()) <= 1
    pseudo = t.source == "pseudo"
    assert set(t.group[pseudo]) == {"Data-1_coronacases_org_001", "Data-1_coronacases_org_002"}
    assert (t.label[pseudo] == 1).all() and t.volume_label["Data-1_coronacases_org_001"] == 1
    # pseudo slices keep their axial slice number, 2D screenshots have none
    assert (t.order[pseudo] > 0).all() and (t.order[~pseudo] == -1).all()
    # the Otsu-anchored lung mask finds lungs in most screenshots (mean coverage well inside (0, 1))
    cov = t.x[:, 1].float().mean(dim=(1, 2)).numpy()
    assert 0.1 < np.median(cov) < 0.8


def test_folds_never_split_a_volume(real_table: vm.SliceTable) -> None:
    t = real_table
    folds = vm.assign_folds(t.group, t.label, n_folds=3, fixed={"Data-1_coronacases_org_002": None})
    assert "Data-1_coronacases_org_002" not in folds  # kept out of every fold
    assert set(folds) == set(t.group) - {"Data-1_coronacases_org_002"}
    for k in range(3):
        val = {g for g, f in folds.items() if f == k}
        train = set(t.group) - val
        vm.check_disjoint(train, val)
        val_rows, train_rows = t.indices(val), t.indices(train)
        # every slice of a volume is on one side only
        assert not set(t.group[val_rows]) & set(t.group[train_rows])
        assert len(val_rows) + len(train_rows) == len(t)
    with pytest.raises(ValueError, match="both training and validation"):
        vm.check_disjoint({"a", "b"}, {"b"})


def test_bags_use_training_rows_only() -> None:
    t = _table([("vol1", 30, 1, True), ("vol2", 20, 1, True), ("normal", 40, 0, True), ("neg2d", 25, 0, False), ("pos2d", 10, 1, False)])
    val = t.indices(["vol2"])
    train = np.setdiff1d(np.arange(len(t)), val)
    bags = vm.BagBuilder(t, train, max_slices=24, min_slices=8)
    assert set(bags.kinds) == {"pos_volume", "pos_2d", "neg_volume", "neg_2d", "neg_mixed"}
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        rows, y, sl = bags.sample(rng)
        assert not set(rows.tolist()) & set(val.tolist())
        assert 1 <= len(rows) <= 24 + 12
        np.testing.assert_array_equal(sl, t.label[rows])
        assert (y == 1) == bool((sl == 1).any())  # a positive bag holds a positive slice, a negative bag none
        seen |= set(t.group[rows].tolist())
        if y == 1 and "vol1" in t.group[rows]:
            z = t.order[rows][t.group[rows] == "vol1"]
            assert (np.diff(z) == 1).all()  # the lesion run keeps its axial order
    assert "vol2" not in seen and {"vol1", "normal", "neg2d", "pos2d"} <= seen


def test_threshold_at_fpr_hand_computed() -> None:
    neg = np.arange(1, 21) / 20.0  # 20 negatives 0.05 ... 1.0
    t = vm.threshold_at_fpr(neg, 0.05)  # one negative (5 %) may be at or above t
    assert (neg >= t).sum() == 1 and 0.95 < t <= 1.0
    assert (neg >= vm.threshold_at_fpr(neg, 0.0)).sum() == 0
    assert (neg >= vm.threshold_at_fpr(neg, 0.12)).sum() == 2  # floor(0.12 * 20) = 2
    tied = np.array([0.9, 0.9, 0.1, 0.2] * 5, np.float32)  # float32 ties at the cut: stay at or below the rate
    assert (tied >= vm.threshold_at_fpr(tied, 0.05)).mean() <= 0.05
    assert vm.volume_threshold_from_bags(np.array([0.1, 0.2, 0.7, 0.9]), np.array([0, 0, 1, 1])) == pytest.approx(0.45)


def test_confidence_intervals() -> None:
    lo, hi = vm.wilson_ci(0, 154)
    assert lo == pytest.approx(0.0, abs=1e-12) and 0.02 < hi < 0.03  # 0 of 154 positive: upper bound about 2.4 %
    lo, hi = vm.wilson_ci(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    truth = np.r_[np.zeros(40), np.ones(60), np.zeros(48)]
    lo, hi = vm.block_bootstrap_f1(truth, truth, n_boot=200)
    assert lo == hi == 1.0
    noisy = truth.copy()
    noisy[::7] = 1 - noisy[::7]
    lo, hi = vm.block_bootstrap_f1(truth, noisy, n_boot=300)
    f1 = binary_metrics(truth, noisy)["F1"]
    assert lo < f1 < hi < 1.0


def test_real_volume_share_draws_real_series() -> None:
    t = _table([("vol1", 30, 1, True), ("normal", 40, 0, True), ("neg2d", 25, 0, False)])
    t.source[t.group == "vol1"] = "ct_dicom"  # a real HU series
    t2 = _table([("pseudo", 30, 1, True), ("vol1", 30, 1, True), ("normal", 40, 0, True), ("neg2d", 25, 0, False)])
    t2.source[t2.group == "vol1"] = "ct_dicom"
    rng = np.random.default_rng(0)
    for share, expected in ((1.0, {"vol1"}), (0.0, {"vol1", "pseudo"})):
        bags = vm.BagBuilder(t2, np.arange(len(t2)), real_volume_share=share)
        assert bags.real_pos == ["vol1"]
        drawn = {g for _ in range(60) for g in t2.group[bags.sample(rng, "pos_volume")[0]].tolist()} - {"normal", "neg2d"}
        assert drawn == expected
    assert vm.BagBuilder(t, np.arange(len(t))).real_pos == ["vol1"]


def test_equalize_slices_removes_the_display_window() -> None:
    """Two exports of one slice with different windows (an increasing grey map) equalise to the same image; the
    lung-mask channel is untouched; a table's equalised copy keeps its labels and groups."""
    from monai_covid.volume_detector import equalize_slices

    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 64, 64, generator=g)
    mask = (torch.rand(1, 64, 64, generator=g) > 0.5).float()
    narrow = 0.2 + 0.3 * base  # a dark, low-contrast export
    wide = base**0.5  # a bright one
    x = torch.stack([torch.cat([narrow, mask]), torch.cat([wide, mask])])
    eq = equalize_slices(x)
    assert torch.equal(eq[:, 1], x[:, 1]) and not torch.equal(eq[:, 0], x[:, 0])
    assert float((x[0, 0] - x[1, 0]).abs().mean()) > 0.15
    assert float((eq[0, 0] - eq[1, 0]).abs().max()) < 0.02  # same grey order -> same equalised image
    assert abs(float(eq[:, 0].mean()) - 0.5) < 0.02 and float(eq[:, 0].min()) >= 0 and float(eq[:, 0].max()) <= 1
    table = vm.SliceTable(x.half(), [1, 0], [1, 0], ["a", "b"], ["pseudo", "cls"], [0, -1], {"a": 1})
    t2 = table.equalized()
    assert t2.x.dtype == torch.float16 and t2.group.tolist() == ["a", "b"] and t2.label.tolist() == [1, 0]
    assert torch.allclose(t2.x[:, 0].float(), eq[:, 0], atol=2e-3)
