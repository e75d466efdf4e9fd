"""Segmentation losses of the A-SegNet paper (Dice, Tversky, focal Tversky) and the co-supervision loss of the
Co-supervision ResUnet paper (segmentation + edge + auxiliary semantic terms).

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

from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn.functional as F

from monai.losses import DiceCELoss, DiceLoss, TverskyLoss
from monai.utils import LossReduction

__all__ = ["FocalTverskyLoss", "segmentation_loss", "morphological_edge", "downsample_mask", "CoSupervisionLoss"]


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


def _max_pool(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    pool = F.max_pool2d if x.ndim == 4 else F.max_pool3d
    return pool(x, kernel_size, stride=1, padding=kernel_size // 2)


def morphological_edge(mask: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """Lesion boundaries of a binary mask ``(B, 1, *spatial)``: the morphological gradient, dilation minus erosion
    with a ``kernel_size`` square (cube) structuring element; same shape and dtype, values 0/1.

    With ``kernel_size=3`` the edge is two pixels wide: the outermost pixels of each lesion and the background
    pixels touching it. The image border does not count as a boundary (padding never erodes or dilates).
    """
    if kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}")
    m = (mask > 0.5).to(torch.float32)
    edge = _max_pool(m, kernel_size) - (-_max_pool(-m, kernel_size))
    return edge.to(mask.dtype)


def downsample_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A binary mask ``(B, 1, *spatial)`` at a coarser ``size``: area average, then majority (>= 0.5), 0/1."""
    frac = F.interpolate((mask > 0.5).to(torch.float32), size=tuple(size), mode="area")
    return (frac >= 0.5).to(mask.dtype)


class CoSupervisionLoss(_Loss):
    """Co-supervision loss of the Co-supervision ResUnet (Hu et al., Pattern Recognition 2022, arXiv:2112.10368)::

        L = L_seg(seg, y) + edge_weight * L_edge(edge, grad(y)) + aux_weight * mean_k L_seg(aux_k, down_k(y))

    ``grad(y)`` is :func:`morphological_edge` of the label and ``down_k(y)`` the label down-sampled to the size of
    auxiliary head ``k`` (:func:`downsample_mask`): every target is derived from the lesion mask, so the bundle's data
    and transforms are those of any segmentation bundle. The paper's abstract gives neither the terms nor the weights;
    the defaults are Dice + cross-entropy for the segmentation and auxiliary heads and Dice + binary cross-entropy for
    the (sparse) edge map, both weights 0.5.

    Args:
        edge_weight: weight of the edge term; 0 removes it.
        aux_weight: weight of the auxiliary term; 0 removes it.
        edge_kernel_size: structuring element of the morphological gradient.
        seg_loss: loss of the segmentation and auxiliary heads, ``(logits (B, C, ...), label (B, 1, ...))``;
            default ``DiceCELoss(to_onehot_y=True, softmax=True)``.
        edge_loss: loss of the edge head, ``(logits (B, 1, ...), edge (B, 1, ...))``; default
            ``DiceCELoss(sigmoid=True)``.

    ``input``: the training-mode output of :class:`monai_covid.networks.cosup_resunet.CoSupResUnet` (a dict with
    ``"seg"`` and, where the modules are on, ``"edge"`` and ``"aux"``) or a plain ``(B, C, ...)`` tensor (segmentation
    term only). ``target``: the label ``(B, 1, *spatial)``, 0/1.
    """

    def __init__(
        self,
        edge_weight: float = 0.5,
        aux_weight: float = 0.5,
        edge_kernel_size: int = 3,
        seg_loss: _Loss | None = None,
        edge_loss: _Loss | None = None,
    ) -> None:
        super().__init__()
        self.edge_weight, self.aux_weight, self.edge_kernel_size = float(edge_weight), float(aux_weight), edge_kernel_size
        self.seg_loss = seg_loss if seg_loss is not None else DiceCELoss(to_onehot_y=True, softmax=True)
        self.edge_loss = edge_loss if edge_loss is not None else DiceCELoss(sigmoid=True)

    def terms(self, input: torch.Tensor | Mapping[str, Any], target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unweighted terms present: ``"seg"`` always, ``"edge"`` / ``"aux"`` where the head exists and its
        weight is not 0."""
        out = input if isinstance(input, Mapping) else {"seg": input}
        terms = {"seg": self.seg_loss(out["seg"], target)}
        if self.edge_weight != 0 and out.get("edge") is not None:
            terms["edge"] = self.edge_loss(out["edge"], morphological_edge(target, self.edge_kernel_size))
        if self.aux_weight != 0 and out.get("aux"):
            aux = [self.seg_loss(a, downsample_mask(target, a.shape[2:])) for a in out["aux"]]
            terms["aux"] = torch.stack(aux).mean()
        return terms

    def forward(self, input: torch.Tensor | Mapping[str, Any], target: torch.Tensor) -> torch.Tensor:
        t = self.terms(input, target)
        weights = {"seg": 1.0, "edge": self.edge_weight, "aux": self.aux_weight}
        return sum(weights[k] * v for k, v in t.items())
