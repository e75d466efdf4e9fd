"""Threshold-based lung mask (ResNeXt+ paper, seed 004, Sec. IV-B, after Liao et al.).

Steps, on HU: threshold at -600 HU, drop air connected to the in-plane image border (outside the body), keep the
two largest remaining components (one when the lungs are merged through the trachea/carina or the second is
too small to be a lung), fill holes slice by slice (vessels, consolidations; not the mediastinum when both lungs
enclose it), replace each lung in a slice by its convex hull when the hull is not much larger (Liao's rule:
hull area < ``hull_max_ratio`` x area, so a concave lung next to the heart is not filled into the mediastinum;
lungs joined at a junction line are split first), then dilate to include the lung wall.

Input: HU array ``(z, y, x)`` for a volume or ``(y, x)`` for one slice. Output: bool array of the same shape.
The trachea and main bronchi are air below -600 HU connected to the lungs and stay in the mask.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_data_type, convert_to_dst_type
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError
from skimage.morphology import remove_small_holes

__all__ = ["lung_mask", "lung_volume_ml", "LungMask", "LungMaskd"]


def _remove_border_air(binary: np.ndarray) -> np.ndarray:
    """Remove 3D components of ``binary`` (z, y, x) that touch the in-plane border of any slice."""
    labels, n = ndi.label(binary)
    if n == 0:
        return binary
    border = np.unique(np.concatenate([labels[:, 0, :].ravel(), labels[:, -1, :].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]))
    keep = np.ones(n + 1, dtype=bool)
    keep[border] = False
    keep[0] = False
    return keep[labels]


def _largest_components(binary: np.ndarray, min_ratio: float, min_voxels: int) -> np.ndarray:
    labels, n = ndi.label(binary)
    if n == 0:
        return binary
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    order = np.argsort(sizes)[::-1]
    keep = [order[0]] if sizes[order[0]] >= min_voxels else []
    if keep and n > 1 and sizes[order[1]] >= max(min_ratio * sizes[order[0]], min_voxels):
        keep.append(order[1])
    return np.isin(labels, keep)


def _convex_hull(comp: np.ndarray) -> np.ndarray:
    """Filled convex hull of a 2D mask: hull of the boundary pixels, rasterised as a polygon, united with the mask.

    (Much faster than ``skimage.morphology.convex_hull_image``, which tests every pixel against the polygon.)
    """
    edge = comp & ~ndi.binary_erosion(comp)
    pts = np.argwhere(edge)
    if len(pts) < 3:
        return comp
    try:
        hull = ConvexHull(pts)
    except QhullError:  # collinear points: the mask is a line
        return comp
    v = pts[hull.vertices]
    canvas = Image.new("1", (comp.shape[1], comp.shape[0]), 0)
    ImageDraw.Draw(canvas).polygon([(int(c), int(r)) for r, c in v], fill=1, outline=1)
    return comp | np.asarray(canvas, dtype=bool)


def _hull_or_self(comp: np.ndarray, hull_max_ratio: float) -> np.ndarray:
    hull = _convex_hull(comp)
    return hull if hull.sum() < hull_max_ratio * comp.sum() else comp


def _split_columns(comp: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Split a component holding both lungs (joined at a junction line) at its narrowest central column."""
    cols = comp.sum(axis=0)
    w = comp.shape[1]
    lo, hi = w // 3, 2 * w // 3
    if hi - lo < 3:
        return None
    cut = lo + int(np.argmin(cols[lo:hi]))
    left, right = comp.copy(), comp.copy()
    left[:, cut:] = False
    right[:, :cut] = False
    if left.sum() < 0.2 * comp.sum() or right.sum() < 0.2 * comp.sum():
        return None
    return left, right


def _hull_slice(mask2d: np.ndarray, hull_max_ratio: float) -> np.ndarray:
    """Convex hull per lung in one slice; a component spanning both lungs is split first."""
    labels, n = ndi.label(mask2d)
    out = mask2d.copy()
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        comp = labels[sl] == i
        if comp.sum() < 16:
            continue
        hull = _convex_hull(comp)
        if hull.sum() < hull_max_ratio * comp.sum():
            out[sl] |= hull
            continue
        halves = _split_columns(comp)
        if halves is not None:
            for half in halves:
                out[sl] |= _hull_or_self(half, hull_max_ratio)
    return out


def lung_mask(
    hu: np.ndarray,
    spacing: Sequence[float] | None = None,
    threshold: float = -600.0,
    hull_max_ratio: float = 1.3,
    max_hole_cm2: float = 10.0,
    dilation_mm: float = 2.0,
    min_lung_ratio: float = 0.2,
    min_lung_ml: float = 20.0,
    min_lung_cm2: float = 2.0,
) -> np.ndarray:
    """Lung mask of a CT in HU.

    Args:
        hu: ``(z, y, x)`` volume or ``(y, x)`` slice in Hounsfield units.
        spacing: voxel size in mm, ``(z, y, x)`` (or ``(y, x)``); 1 mm when unknown.
        threshold: lung tissue is below this HU (paper: -600).
        hull_max_ratio: a slice component becomes its convex hull only if the hull is smaller than this
            multiple of its area (a component spanning both lungs is split at its narrowest column first).
        max_hole_cm2: enclosed holes up to this area are filled (vessels, airways, consolidation); larger ones
            (the mediastinum enclosed by lungs that touch in front and behind) are not.
        dilation_mm: in-plane dilation radius that adds the lung wall (paper: "dilation ... to include the outer
            wall"); 0 disables it.
        min_lung_ratio: the second-largest component is kept as the other lung only when it is at least this
            fraction of the largest (so stomach or bowel gas is not taken for a lung).
        min_lung_ml: components smaller than this (mL) are never taken as lung (volumes).
        min_lung_cm2: the same for a single 2D slice, as an area.

    Returns:
        bool array, same shape as ``hu``.
    """
    hu = np.asarray(hu)
    if hu.ndim not in (2, 3):
        raise ValueError(f"lung_mask expects a (y, x) slice or (z, y, x) volume, got shape {hu.shape}")
    squeeze = hu.ndim == 2
    vol = hu[None] if squeeze else hu
    if spacing is None:
        spacing = (1.0,) * hu.ndim
    spacing = tuple(float(s) for s in spacing)
    sz = 1.0 if squeeze else spacing[0]
    sy, sx = spacing[-2], spacing[-1]
    voxel_ml = sz * sy * sx / 1000.0

    # light in-plane smoothing so that noise in low-dose CT does not break the lung into fragments
    smooth = ndi.uniform_filter(vol.astype(np.float32), size=(1, 3, 3))
    binary = smooth < threshold
    binary = _remove_border_air(binary)
    min_voxels = min_lung_cm2 * 100.0 / (sy * sx) if squeeze else min_lung_ml / voxel_ml
    binary = _largest_components(binary, min_lung_ratio, max(1, int(min_voxels)))
    out = np.zeros_like(binary)
    if not binary.any():
        return out[0] if squeeze else out
    # per-slice steps run on the in-plane bounding box of the lungs (plus room for the dilation)
    pad = int(np.ceil(dilation_mm / min(sy, sx))) + 2
    ys, xs = np.flatnonzero(binary.any(axis=(0, 2))), np.flatnonzero(binary.any(axis=(0, 1)))
    y0, y1 = max(ys[0] - pad, 0), min(ys[-1] + pad + 1, binary.shape[1])
    x0, x1 = max(xs[0] - pad, 0), min(xs[-1] + pad + 1, binary.shape[2])
    max_hole_px = int(max_hole_cm2 * 100.0 / (sy * sx))
    zs = np.flatnonzero(binary.any(axis=(1, 2)))
    box = np.zeros((len(zs), y1 - y0, x1 - x0), dtype=bool)
    for i, z in enumerate(zs):
        s = remove_small_holes(binary[z, y0:y1, x0:x1], max_size=max_hole_px)
        box[i] = _hull_slice(s, hull_max_ratio)
    radius = int(round(dilation_mm / min(sy, sx))) if dilation_mm > 0 else 0
    if radius > 0:
        # in-plane dilation by about a disc of dilation_mm: alternating cross and square steps give an octagon
        cross = ndi.generate_binary_structure(2, 1)[None]
        square = ndi.generate_binary_structure(2, 2)[None]
        for i in range(radius):
            box = ndi.binary_dilation(box, structure=cross if i % 2 == 0 else square)
    out[zs, y0:y1, x0:x1] = box
    return out[0] if squeeze else out


def lung_volume_ml(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Volume of a ``(z, y, x)`` mask in millilitres for voxel size ``spacing`` ``(z, y, x)`` mm."""
    return float(np.count_nonzero(mask)) * float(np.prod(spacing)) / 1000.0


class LungMask(Transform):
    """Array transform: HU image -> lung mask (same shape and type, 1/0 values).

    Accepts ``(y, x)``, ``(z, y, x)`` or channel-first ``(1, y, x)`` / ``(1, z, y, x)``; ``spacing`` as in
    :func:`lung_mask`, or taken from a MetaTensor's ``pixdim`` when not given.
    """

    backend = ["numpy"]

    def __init__(self, spacing: Sequence[float] | None = None, channel_first: bool = True, **kwargs) -> None:
        self.spacing = spacing
        self.channel_first = channel_first
        self.kwargs = kwargs

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        arr, *_ = convert_data_type(img, np.ndarray)
        has_channel = self.channel_first and arr.ndim in (3, 4) and arr.shape[0] == 1 and arr.ndim - 1 >= 2
        core = arr[0] if has_channel else arr
        mask = lung_mask(core, spacing=self.spacing, **self.kwargs).astype(np.float32)
        if has_channel:
            mask = mask[None]
        out, *_ = convert_to_dst_type(mask, dst=img, dtype=torch.float32 if isinstance(img, torch.Tensor) else np.float32)
        return out


class LungMaskd(MapTransform):
    """Dictionary version of :class:`LungMask`: reads ``keys`` (HU) and writes ``{key}{suffix}`` or ``output_keys``."""

    backend = LungMask.backend

    def __init__(
        self,
        keys: KeysCollection,
        output_keys: KeysCollection | None = None,
        spacing: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_keys = list(output_keys) if output_keys is not None else [f"{k}_lung" for k in self.keys]
        if len(self.output_keys) != len(self.keys):
            raise ValueError("output_keys must match keys in length")
        self.masker = LungMask(spacing=spacing, **kwargs)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            d[out_key] = self.masker(d[key])
        return d
