"""Focal Tversky / Tversky / Dice losses (paper 000, Eqs. 4-8) against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from monai.losses import DiceLoss, TverskyLoss
from monai_covid.losses import FocalTverskyLoss, segmentation_loss


def _probs(values, shape=(1, 1, 2, 2)) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


# (prediction probabilities, target, TP, FP, FN) counted by hand on 2x2 images
HAND_CASES = [
    ([1.0, 0.5, 0.5, 0.0], [1, 1, 0, 0], 1.5, 0.5, 0.5),
    ([1.0, 1.0, 0.0, 0.0], [1, 0, 0, 0], 1.0, 1.0, 0.0),  # one false positive
    ([1.0, 0.0, 0.0, 0.0], [1, 1, 0, 0], 1.0, 0.0, 1.0),  # one false negative
]


@pytest.mark.parametrize("pred,target,tp,fp,fn", HAND_CASES)
def test_focal_tversky_hand_computed(pred, target, tp, fp, fn):
    alpha, beta, gamma = 0.3, 0.7, 4.0 / 3.0
    ti = tp / (tp + alpha * fp + beta * fn)  # smoothing terms are 1e-5, negligible at this tolerance
    expected = (1.0 - ti) ** (1.0 / gamma)
    loss = FocalTverskyLoss(smooth_nr=0.0, smooth_dr=0.0)(_probs(pred), _probs(target))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_first_hand_case_value():
    # TI = 1.5 / (1.5 + 0.3 * 0.5 + 0.7 * 0.5) = 0.75 -> (0.25) ** 0.75 = 0.353553...
    loss = FocalTverskyLoss()(_probs([1.0, 0.5, 0.5, 0.0]), _probs([1, 1, 0, 0]))
    assert loss.item() == pytest.approx(0.25**0.75, abs=1e-4)
    assert loss.item() == pytest.approx(0.3535534, abs=1e-4)


def test_false_negatives_cost_more_than_false_positives():
    ftl = FocalTverskyLoss()
    fp_loss = ftl(_probs([1.0, 1.0, 0.0, 0.0]), _probs([1, 0, 0, 0]))
    fn_loss = ftl(_probs([1.0, 0.0, 0.0, 0.0]), _probs([1, 1, 0, 0]))
    assert fn_loss > fp_loss


def test_softmax_two_classes_sums_over_classes():
    # near one-hot logits: prediction [1, 0, 0, 0] for lesion, target [1, 1, 0, 0]
    lesion = torch.tensor([20.0, -20.0, -20.0, -20.0])
    logits = torch.stack([-lesion, lesion]).reshape(1, 2, 2, 2)
    target = _probs([1, 1, 0, 0])
    loss = FocalTverskyLoss(softmax=True, to_onehot_y=True, smooth_nr=0.0, smooth_dr=0.0)(logits, target)
    # lesion: TP 1, FP 0, FN 1 -> TI = 1 / 1.7; background: TP 2, FP 1, FN 0 -> TI = 2 / 2.3
    expected = (1 - 1 / 1.7) ** 0.75 + (1 - 2 / 2.3) ** 0.75
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    no_bg = FocalTverskyLoss(softmax=True, to_onehot_y=True, include_background=False, smooth_nr=0.0, smooth_dr=0.0)
    assert no_bg(logits, target).item() == pytest.approx((1 - 1 / 1.7) ** 0.75, abs=1e-5)


def test_gamma_one_is_tversky_and_reductions():
    torch.manual_seed(0)
    pred, target = torch.rand(3, 1, 8, 8), (torch.rand(3, 1, 8, 8) > 0.5).float()
    ftl = FocalTverskyLoss(gamma=1.0)
    assert ftl(pred, target).item() == pytest.approx(TverskyLoss(alpha=0.3, beta=0.7)(pred, target).item(), abs=1e-6)
    per_item = FocalTverskyLoss(reduction="none")(pred, target)
    assert per_item.shape == (3,)
    assert FocalTverskyLoss(reduction="sum")(pred, target).item() == pytest.approx(per_item.sum().item(), abs=1e-5)
    perfect = FocalTverskyLoss()(target, target)
    assert perfect.item() < 1e-3


def test_loss_factory():
    assert isinstance(segmentation_loss("dice", softmax=True), DiceLoss)
    tl = segmentation_loss("tversky", alpha=0.7, beta=0.3)
    assert isinstance(tl, TverskyLoss) and (tl.alpha, tl.beta) == (0.7, 0.3)
    ftl = segmentation_loss("focal_tversky", gamma=2.0)
    assert isinstance(ftl, FocalTverskyLoss) and ftl.gamma == 2.0
    with pytest.raises(ValueError, match="unknown loss"):
        segmentation_loss("cross_entropy")
    with pytest.raises(ValueError):
        FocalTverskyLoss(gamma=0)
