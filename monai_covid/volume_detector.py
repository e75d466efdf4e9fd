"""Volume-level COVID-19 detection with slice scores (ResNeXt+, paper 004): pre-processing, chunked inference, the
MIL loss, slice-report writing and evaluation (the training recipe, slice table and bags: ``monai_covid.volume_mil``).

Pre-processing of a CT volume (``preprocess_volume``), the paper's chain with our documented choices:

1. HU -> lung mask (``data_prep.lung.lung_mask``, computed by the caller once per case).
2. Crop every slice to the square in-plane bounding box of the whole volume's lung mask (+8 % margin). Our choice:
   the 2D training slices (``ct_slices_cls``) are crops around the chest, so cropping the volume makes the two
   sources look alike; it also spends the network's pixels on the lungs.
3. HU window ``[-1100, 250]`` -> [0, 1] (``HUWindow``; the display scale of the 8-bit lung-window slices, the same
   window as the lesion bundles' ``monai_covid.inference.lesion.HU_WINDOW``), then the gamma-sigmoid tone map (``ToneMap``, gamma 1.5, a 0.35) applied to the [0, 1] image
   (``input_scale=1``; on a 0-255 scale, eq. 5 saturates everything brighter than about -1000 HU).
4. Resize to ``size`` x ``size`` (paper 224; slim model 128); mask resized by nearest neighbour.

Result per slice: 2 channels (image, lung mask). 8-bit 2D slices (``preprocess_slice_8bit``) are read on the same
display scale (``p / 255``, as the lesion bundles read them), tone mapped, and get a lung mask from the lead's
``lung_mask`` on the pseudo-HU image that scale implies (``-1100 + 1350 * p / 255``), falling back to a filled
threshold mask when that finds no lung.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage as ndi

from data_prep.intensity import HUWindow, ToneMap

__all__ = [
    "VOLUME_WINDOW",
    "lung_crop_box",
    "preprocess_volume",
    "preprocess_slice_8bit",
    "lung_mask_8bit",
    "equalize_slices",
    "encode_volume",
    "predict_volume",
    "predict_volume_details",
    "MILLoss",
    "binary_metrics",
    "VolumeDetectorRunner",
    "evaluate_ct_dicom",
    "save_state_dict_fp16",
    "load_state_dict_fp16",
]

VOLUME_WINDOW = (-1100.0, 250.0)  # = monai_covid.inference.lesion.HU_WINDOW (display scale of the 8-bit sets)
_TONE = ToneMap(gamma=1.5, a=0.35, input_scale=1.0)


# ----------------------------------------------------------------------------------------------- pre-processing


def lung_crop_box(lung: np.ndarray, margin: float = 0.08) -> tuple[int, int, int, int]:
    """Square (y0, y1, x0, x1) around the in-plane extent of a (z, y, x) or (y, x) mask; whole image when empty."""
    m = np.asarray(lung, dtype=bool)
    proj = m.any(axis=0) if m.ndim == 3 else m
    h, w = proj.shape
    if not proj.any():
        side = min(h, w)
        return (h - side) // 2, (h - side) // 2 + side, (w - side) // 2, (w - side) // 2 + side
    ys, xs = np.nonzero(proj.any(axis=1))[0], np.nonzero(proj.any(axis=0))[0]
    cy, cx = (ys[0] + ys[-1] + 1) / 2.0, (xs[0] + xs[-1] + 1) / 2.0
    side = max(ys[-1] - ys[0] + 1, xs[-1] - xs[0] + 1) * (1.0 + 2 * margin)
    side = int(min(max(side, 16), max(h, w)))
    y0 = int(round(min(max(cy - side / 2, 0), max(h - side, 0))))
    x0 = int(round(min(max(cx - side / 2, 0), max(w - side, 0))))
    return y0, min(y0 + side, h), x0, min(x0 + side, w)


def _resize_pair(img: torch.Tensor, mask: torch.Tensor, size: int) -> torch.Tensor:
    """(N, H, W) image and mask -> (N, 2, size, size) float32."""
    img = F.interpolate(img[:, None].float(), size=(size, size), mode="area" if img.shape[-1] > size else "bilinear")
    mask = F.interpolate(mask[:, None].float(), size=(size, size), mode="nearest")
    return torch.cat([img, mask], dim=1)


def preprocess_volume(
    hu: np.ndarray,
    lung: np.ndarray,
    size: int = 128,
    window: Sequence[float] = VOLUME_WINDOW,
    crop: bool = True,
    box: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """HU (z, y, x) + lung mask (z, y, x) -> (z, 2, size, size) float32 tensor (see module docstring).

    ``box`` (from :func:`lung_crop_box` on the whole volume) lets a caller process a volume in chunks of slices with
    one consistent crop.
    """
    hu = np.asarray(hu)
    lung = np.asarray(lung)
    if hu.shape != lung.shape or hu.ndim != 3:
        raise ValueError(f"HU {hu.shape} and lung mask {lung.shape} must be matching (z, y, x) arrays")
    if crop:
        y0, y1, x0, x1 = box if box is not None else lung_crop_box(lung)
        hu, lung = hu[:, y0:y1, x0:x1], lung[:, y0:y1, x0:x1]
    img = HUWindow(window[0], window[1])(torch.as_tensor(np.ascontiguousarray(hu), dtype=torch.float32))
    img = _TONE(torch.round(img * 255.0) / 255.0)  # 8-bit display levels, like the 2D training slices
    return _resize_pair(img, torch.as_tensor(np.ascontiguousarray(lung)), size)


def _fallback_mask(u8: np.ndarray, threshold: float = 128.0) -> np.ndarray:
    m = ndi.binary_opening(u8 < threshold, iterations=2)
    m = ndi.binary_fill_holes(m)
    labels, n = ndi.label(m)
    if n == 0:
        return np.ones_like(m)
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.argsort(sizes)[::-1][:2] + 1
    return ndi.binary_dilation(np.isin(labels, keep), iterations=2)


def lung_mask_8bit(u8: np.ndarray) -> np.ndarray:
    """Lung mask (y, x) bool of a windowed 8-bit CT slice whose window is unknown.

    The window differs between the 2D sets (lungs at grey 40 in coronacases, 150 in ct_slices_cls), so the
    pseudo-HU image handed to ``data_prep.lung.lung_mask`` puts the image's Otsu threshold (air/lung vs. tissue) at
    -600 HU, ``lung_mask``'s own threshold; a filled Otsu-threshold mask is the fallback when that finds no lung.
    """
    from skimage.filters import threshold_otsu

    from data_prep.lung import lung_mask

    a = np.asarray(u8, dtype=np.float32)
    if a.ndim == 3:
        a = a[..., 0]
    otsu = float(threshold_otsu(a)) if a.max() > a.min() else 128.0
    lo, hi = VOLUME_WINDOW
    try:
        mask = lung_mask(-600.0 + (a - otsu) * (hi - lo) / 255.0)
    except Exception:  # the fallback below is the documented behaviour for odd screenshots
        mask = np.zeros(a.shape, bool)
    if mask.sum() < 0.02 * mask.size:
        mask = _fallback_mask(a, otsu)
    return mask


def preprocess_slice_8bit(u8: np.ndarray, size: int = 128) -> torch.Tensor:
    """A windowed 8-bit CT slice (y, x) (e.g. ``ct_slices_cls``) -> (2, size, size) float32 (image, lung mask).

    Image: ``p / 255`` (the display scale HU volumes are mapped to), tone mapped; lung mask: :func:`lung_mask_8bit`.
    """
    a = np.asarray(u8, dtype=np.float32)
    if a.ndim == 3:
        a = a[..., 0]
    mask = lung_mask_8bit(a)
    img_t = _TONE(torch.as_tensor(a / 255.0))
    return _resize_pair(img_t[None], torch.as_tensor(mask)[None], size)[0]


# ------------------------------------------------------------------------------------------------------ inference


@torch.no_grad()
def equalize_slices(x: torch.Tensor, num_bins: int = 256) -> torch.Tensor:
    """Per-slice histogram equalisation of the image channel of detector inputs ``(N, 2, s, s)`` (mask untouched).

    Equalisation is invariant to any increasing grey map, so the display window a slice was exported with (the
    2D sets put the lungs anywhere from grey 40 to 150) no longer tells the sources apart; what is left is the order
    of grey values inside the slice. ``monai.transforms.HistogramNormalize`` on each slice, output in [0, 1].
    """
    from monai.transforms import HistogramNormalize

    eq = HistogramNormalize(num_bins=num_bins, min=0.0, max=1.0)
    out = x.clone()
    for i in range(len(out)):
        out[i, 0] = torch.as_tensor(eq(out[i, 0].float()), dtype=out.dtype)
    return out


def encode_volume(
    net: nn.Module,
    hu: np.ndarray,
    lung: np.ndarray,
    size: int = 128,
    chunk_size: int = 32,
    device: str | torch.device = "cpu",
    window: Sequence[float] = VOLUME_WINDOW,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-process and encode a volume ``chunk_size`` slices at a time; returns (features (N, F), inputs (N, 2, s, s)).

    Only one chunk of full-size HU slices and one chunk of trunk activations exist at a time; the returned inputs
    are the small pre-processed slices (kept for the montage).
    """
    box = lung_crop_box(lung)
    feats, inputs = [], []
    for z0 in range(0, hu.shape[0], chunk_size):
        x = preprocess_volume(hu[z0 : z0 + chunk_size], lung[z0 : z0 + chunk_size], size=size, window=window, box=box)
        feats.append(net.slice_features(x.to(device)).float().cpu())
        inputs.append(x.half())
    return torch.cat(feats), torch.cat(inputs)


@torch.no_grad()
def predict_volume_details(
    net: nn.Module,
    hu_zyx: np.ndarray,
    lung_mask_zyx: np.ndarray,
    size: int = 128,
    chunk_size: int = 32,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """``covid_probability``, ``slice_scores`` (N,), ``attention`` (N,) and the pre-processed ``inputs``."""
    was_training = net.training
    net.eval()
    try:
        feats, inputs = encode_volume(net, hu_zyx, lung_mask_zyx, size=size, chunk_size=chunk_size, device=device)
        logits, alpha, scores = net.head_from_features(feats[None].to(device))
    finally:
        net.train(was_training)
    return {
        "covid_probability": float(torch.softmax(logits, -1)[0, 1]),
        "slice_scores": scores[0].float().cpu().numpy(),
        "attention": alpha[0].float().cpu().numpy(),
        "inputs": inputs,
    }


def predict_volume(
    net: nn.Module,
    hu_zyx: np.ndarray,
    lung_mask_zyx: np.ndarray,
    size: int = 128,
    chunk_size: int = 32,
    device: str | torch.device = "cpu",
) -> tuple[float, np.ndarray]:
    """(COVID-19 probability of the volume, slice scores (N,) in [0, 1]) for a HU volume and its lung mask."""
    d = predict_volume_details(net, hu_zyx, lung_mask_zyx, size=size, chunk_size=chunk_size, device=device)
    return d["covid_probability"], d["slice_scores"]


# ------------------------------------------------------------------------------------------------------ training


class MILLoss(nn.Module):
    """Volume cross-entropy (the paper's 2-way softmax + BCE, eq. 20) plus a multiple-instance slice term.

    Slice term (weight ``slice_weight``): BCE of every slice score whose label is known (2D labelled slices, slices
    of a negative volume) and, for a positive bag, BCE(max slice score, 1) -- only bag labels, never P001's slice
    labels. Input: ``(logits (B, 2), attention (B, N), slice_scores (B, N))`` and the target dict of
    :func:`prepare_bag_batch` (or a plain (B,) label tensor for the volume term only).
    """

    def __init__(self, slice_weight: float = 1.0) -> None:
        super().__init__()
        self.slice_weight = slice_weight

    def forward(self, preds: Sequence[torch.Tensor], target: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        logits, _, scores = preds
        label = target["label"] if isinstance(target, dict) else target
        label = label.view(-1).long()
        loss = F.cross_entropy(logits, label)
        if self.slice_weight <= 0 or not isinstance(target, dict):
            return loss
        sl = target["slice_labels"]
        scores = scores.clamp(1e-6, 1 - 1e-6)
        known = sl >= 0
        terms = []
        if known.any():
            terms.append(F.binary_cross_entropy(scores[known], sl[known].float()))
        pos = label == 1
        if pos.any():
            terms.append(F.binary_cross_entropy(scores[pos].max(dim=1).values, torch.ones_like(label[pos], dtype=scores.dtype)))
        if terms:
            loss = loss + self.slice_weight * sum(terms) / len(terms)
        return loss


# ------------------------------------------------------------------------------------------------------ metrics


def binary_metrics(y_true: Sequence[int], y_pred: Sequence[int]) -> dict[str, float]:
    """ACC, PRE, F1, SEN, SPE (paper Table 1) and the confusion counts; undefined ratios are NaN."""
    t = np.asarray(y_true).astype(int)
    p = np.asarray(y_pred).astype(int)
    tp, tn = int(((t == 1) & (p == 1)).sum()), int(((t == 0) & (p == 0)).sum())
    fp, fn = int(((t == 0) & (p == 1)).sum()), int(((t == 1) & (p == 0)).sum())

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    pre, sen = ratio(tp, tp + fp), ratio(tp, tp + fn)
    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "ACC": ratio(tp + tn, len(t)),
        "PRE": pre,
        "F1": f1,
        "SEN": sen,
        "SPE": ratio(tn, tn + fp),
        "TP": tp,
        "TN": tn,
        "FP": fp,
        "FN": fn,
    }


# ------------------------------------------------------------------------------------------------------ reports


def _slice_png(path: Path, scores: np.ndarray, inputs: torch.Tensor, threshold: float, title: str, n_top: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from monai_covid.io_utils import atomic_save_figure

    top = np.argsort(scores)[::-1][:n_top]
    fig = plt.figure(figsize=(8, 4.2), dpi=80)
    ax = fig.add_axes((0.08, 0.58, 0.9, 0.34))
    ax.plot(np.arange(len(scores)), scores, lw=1.2)
    ax.axhline(threshold, color="r", ls="--", lw=0.8)
    ax.set_ylim(0, 1)
    ax.set_xlim(0, max(len(scores) - 1, 1))
    ax.set_xlabel("slice index", fontsize=8)
    ax.set_ylabel("COVID score", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    for j, z in enumerate(sorted(top)):
        a = fig.add_axes((0.01 + j * 0.1225, 0.02, 0.115, 0.4))
        a.imshow(inputs[z, 0].float().numpy(), cmap="gray", vmin=0, vmax=1)
        a.set_title(f"{z}: {scores[z]:.2f}", fontsize=7)
        a.axis("off")
    atomic_save_figure(fig, path)


class VolumeDetectorRunner:
    """Batch inference over ``dataset_dir``: DICOM series sub-folders and/or NIfTI files in HU.

    Writes ``predictions.csv`` (case, covid_probability, label), ``<case>_slices.csv`` (slice_index,
    instance_number, slice_score, slice_covid) and ``<case>_slices.png`` into ``output_dir``.
    ``instance_number`` is the DICOM InstanceNumber, ``slice_index + 1`` for NIfTI.
    """

    def __init__(
        self,
        network: nn.Module,
        dataset_dir: str | os.PathLike,
        output_dir: str | os.PathLike,
        slice_threshold: float = 0.5,
        volume_threshold: float = 0.5,
        size: int = 128,
        chunk_size: int = 32,
        device: str | torch.device = "cpu",
        save_png: bool = True,
    ) -> None:
        self.network = network
        self.dataset_dir = Path(dataset_dir)
        self.output_dir = Path(output_dir)
        self.slice_threshold = float(slice_threshold)
        self.volume_threshold = float(volume_threshold)
        self.size = size
        self.chunk_size = chunk_size
        self.device = device
        self.save_png = save_png

    def cases(self) -> list[Any]:
        from data_prep.io import InputError, find_cases

        if not self.dataset_dir.is_dir():
            raise InputError(self.dataset_dir, "dataset_dir is not a folder")
        cases = [c for c in find_cases(self.dataset_dir) if c.kind in ("dicom", "nifti")]
        if not cases:
            raise InputError(self.dataset_dir, "no DICOM series or NIfTI volume found")
        return cases

    def run(self) -> list[dict[str, Any]]:
        from data_prep.io import read_volume, safe_name
        from data_prep.lung import lung_mask
        from monai_covid.io_utils import atomic_write_csv

        if self.output_dir.resolve() == self.dataset_dir.resolve() or self.dataset_dir.resolve() in self.output_dir.resolve().parents:
            raise ValueError(f"{self.output_dir}: output_dir must not be inside dataset_dir")
        self.network.to(self.device).eval()
        rows: list[dict[str, Any]] = []
        for case in self.cases():
            name = safe_name(case.rel)
            if case.error:
                print(f"{name}: skipped ({case.error})")
                continue
            t0 = time.time()
            vol = read_volume(case.series if case.series is not None else case.path)
            lung = lung_mask(vol.array, vol.spacing)
            d = predict_volume_details(self.network, vol.array, lung, self.size, self.chunk_size, self.device)
            scores = d["slice_scores"]
            inst = vol.instance_numbers if vol.instance_numbers else list(range(1, len(scores) + 1))
            slice_rows = [
                {
                    "slice_index": i,
                    "instance_number": int(inst[i]),
                    "slice_score": f"{scores[i]:.4f}",
                    "slice_covid": int(scores[i] >= self.slice_threshold),
                }
                for i in range(len(scores))
            ]
            atomic_write_csv(self.output_dir / f"{name}_slices.csv", slice_rows, ["slice_index", "instance_number", "slice_score", "slice_covid"])
            prob = d["covid_probability"]
            label = int(prob >= self.volume_threshold)
            if self.save_png:
                n_pos = sum(r["slice_covid"] for r in slice_rows)
                _slice_png(
                    self.output_dir / f"{name}_slices.png",
                    scores,
                    d["inputs"],
                    self.slice_threshold,
                    f"{name}: P(COVID-19) = {prob:.3f}, {n_pos}/{len(scores)} slices called COVID",
                )
            rows.append({"case": name, "covid_probability": f"{prob:.4f}", "label": label})
            print(f"{name}: {len(scores)} slices, P(COVID-19) = {prob:.3f} -> {label} ({time.time() - t0:.1f} s)", flush=True)
        atomic_write_csv(self.output_dir / "predictions.csv", rows, ["case", "covid_probability", "label"])
        return rows


def evaluate_ct_dicom(
    network: nn.Module,
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    slice_threshold: float,
    volume_threshold: float = 0.5,
    size: int = 128,
    chunk_size: int = 32,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Volume- and slice-level ACC/PRE/F1/SEN/SPE on ``ct_dicom`` (P001 radiologist slice labels; normal001's
    slices are all negative by its diagnosis). Writes ``metrics.json`` and per-series slice CSVs to ``output_dir``."""
    from data_prep.datalists import ct_dicom_datalist
    from data_prep.io import read_volume
    from data_prep.lung import lung_mask
    from monai_covid.io_utils import atomic_write_csv, atomic_write_json

    network.to(device).eval()
    out = Path(output_dir)
    vol_true, vol_pred, sl_true, sl_pred = [], [], [], []
    per_series: dict[str, Any] = {}
    for item in ct_dicom_datalist(data_dir):
        vol = read_volume(item["image"])
        lung = lung_mask(vol.array, vol.spacing)
        prob, scores = predict_volume(network, vol.array, lung, size, chunk_size, device)
        truth = [int(item["slice_labels"].get(i, 0)) for i in vol.instance_numbers]
        calls = (scores >= slice_threshold).astype(int)
        vol_true.append(item["label"])
        vol_pred.append(int(prob >= volume_threshold))
        sl_true += truth
        sl_pred += calls.tolist()
        per_series[item["series_id"]] = {
            "label": item["label"],
            "covid_probability": prob,
            "slice": binary_metrics(truth, calls),
            "positive_slice_fraction": float(calls.mean()),
        }
        atomic_write_csv(
            out / f"{item['series_id']}_slices.csv",
            [{"instance_number": i, "slice_score": f"{s:.4f}", "truth": t} for i, s, t in zip(vol.instance_numbers, scores, truth)],
            ["instance_number", "slice_score", "truth"],
        )
    metrics = {
        "volume": binary_metrics(vol_true, vol_pred),
        "slice": binary_metrics(sl_true, sl_pred),
        "series": per_series,
        "slice_threshold": slice_threshold,
        "volume_threshold": volume_threshold,
    }
    atomic_write_json(out / "metrics.json", metrics)
    print(f"volume: {metrics['volume']}\nslice: {metrics['slice']}")
    for k, v in per_series.items():
        print(f"{k}: P={v['covid_probability']:.3f} slice F1={v['slice']['F1']:.3f} positive fraction={v['positive_slice_fraction']:.3f}")
    return metrics


# ------------------------------------------------------------------------------------------------------ weights


def save_state_dict_fp16(net: nn.Module, path: str | os.PathLike) -> Path:
    """Save a plain fp16 state_dict atomically (the shipped ``models/model.pt`` format)."""
    import io

    from monai_covid.io_utils import atomic_write_bytes

    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()}
    buf = io.BytesIO()
    torch.save(sd, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_state_dict_fp16(net: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load an fp16 (or fp32) state_dict with ``weights_only=True`` and convert back to float."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    net.load_state_dict(sd)
    return net
