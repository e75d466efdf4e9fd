"""Segmentation losses of the A-SegNet paper: Dice, Tversky and focal Tversky.

Budak et al., "Efficient COVID-19 Segmentation from CT Slices Exploiting Semantic Segmentation with Integrated
Attention Mechanism", J Digit Imaging (2021), section "Loss Function" (Eqs. 4-8); focal Tversky from Abraham & Khan,
ISBI 2019.

Convention: ``alpha`` weighs false positives and ``beta`` false negatives, as in ``monai.losses.TverskyLoss``. The
paper's Eq. 7 typesets the weights the other way round, but its results (alpha=0.3, beta=0.7 gives the best
sensitivity, alpha=0.7, beta=0.3 the best specificity) and its aim (weigh false negatives more for small lesions)
only fit this convention.
"""

from __future__ import annotations

import torch
from torch.nn.modules.loss import _Loss

from monai.losses import DiceLoss, TverskyLoss
from monai.utils import LossReduction

__all__ = ["FocalTverskyLoss", "segmentation_loss"]


class FocalTverskyLoss(_Loss):
    """Focal Tversky loss ``L = sum_c (1 - TI_c) ** (1 / gamma)`` (paper Eq. 8), on top of ``TverskyLoss``.

    ``TI_c`` is the Tversky index of class ``c`` from :class:`monai.losses.TverskyLoss` (``reduction="none"``); the
    classes are summed as in the paper, then ``reduction`` is applied over the batch (``batch=True``: one index over
    the whole batch). The defaults are the paper's best setting: alpha=0.3, beta=0.7, gamma=4/3.

    Args:
        alpha: weight of false positives.
        beta: weight of false negatives.
        gamma: focal parameter (1..3); the exponent is ``1 / gamma``; ``gamma=1`` is the plain Tversky loss.
        include_background, to_onehot_y, sigmoid, softmax, smooth_nr, smooth_dr, batch: as in ``TverskyLoss``.
        reduction: ``"mean"`` (over batch items), ``"sum"`` or ``"none"`` (per item, shape ``(B,)``).

    Inputs ``(B, C, *spatial)`` logits or probabilities and a target of the same shape (or ``(B, 1, *spatial)``
    labels with ``to_onehot_y=True``).
    """

    def __init__(
        self,
        alpha: float = 0.3,
        beta: float = 0.7,
        gamma: float = 4.0 / 3.0,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        reduction: LossReduction | str = LossReduction.MEAN,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if gamma <= 0:
            raise ValueError(f"gamma must be positive, got {gamma}")
        self.gamma = float(gamma)
        self.tversky = TverskyLoss(
            include_background=include_background,
            to_onehot_y=to_onehot_y,
            sigmoid=sigmoid,
            softmax=softmax,
            alpha=alpha,
            beta=beta,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
            reduction=LossReduction.NONE,
        )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        one_minus_ti = self.tversky(input, target)  # (B, C), or (C,) with batch=True
        # clamp: (1 - TI) can be a hair below 0 through the smoothing terms, and x ** (1/gamma) has an infinite
        # slope at 0
        per_class = one_minus_ti.clamp_min(1e-7) ** (1.0 / self.gamma)
        per_item = per_class.sum(dim=-1)
        if self.reduction == LossReduction.MEAN.value:
            return per_item.mean()
        if self.reduction == LossReduction.SUM.value:
            return per_item.sum()
        return per_item


def segmentation_loss(name: str = "focal_tversky", **kwargs) -> _Loss:
    """The paper's three losses by name, for configs: ``"dice"``, ``"tversky"`` or ``"focal_tversky"``.

    ``kwargs`` go to the loss (``alpha``/``beta``/``gamma`` only where they apply); the paper's values are the
    defaults.
    """
    common = {k: v for k, v in kwargs.items() if k not in ("alpha", "beta", "gamma")}
    if name == "dice":
        return DiceLoss(**common)
    if name == "tversky":
        return TverskyLoss(alpha=kwargs.get("alpha", 0.3), beta=kwargs.get("beta", 0.7), **common)
    if name == "focal_tversky":
        return FocalTverskyLoss(**kwargs)
    raise ValueError(f"unknown loss {name!r}; choose dice, tversky or focal_tversky")
