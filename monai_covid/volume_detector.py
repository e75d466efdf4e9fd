"""Volume-level COVID-19 detection with slice scores (ResNeXt+, paper 004): pre-processing, chunked inference,
MIL bags for training, the MIL loss, slice-report writing and evaluation.

Pre-processing of a CT volume (``preprocess_volume``), the paper's chain with our documented choices:

1. HU -> lung mask (``data_prep.lung.lung_mask``, computed by the caller once per case).
2. Crop every slice to the square in-plane bounding box of the whole volume's lung mask (+8 % margin). Our choice:
   the 2D training slices (``ct_slices_cls``) are crops around the chest, so cropping the volume makes the two
   sources look alike; it also spends the network's pixels on the lungs.
3. HU window ``[-950, 150]`` -> [0, 1] (``HUWindow``; matches the grey levels of lung and soft tissue in the 2D
   screenshots), then the gamma-sigmoid tone map (``ToneMap``, gamma 1.5, a 0.35) applied to the [0, 1] image
   (``input_scale=1``; on a 0-255 scale, eq. 5 saturates everything brighter than about -1000 HU).
4. Resize to ``size`` x ``size`` (paper 224; slim model 128); mask resized by nearest neighbour.

Result per slice: 2 channels (image, lung mask). 8-bit 2D slices (``preprocess_slice_8bit``) are min-max scaled per
image (their window is unknown), tone mapped, and get a lung mask from the lead's ``lung_mask`` on a pseudo-HU image
(``-1200 + 1200 * p / 255``), falling back to a filled threshold mask when that finds no lung.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
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
    "encode_volume",
    "predict_volume",
    "predict_volume_details",
    "SlicePool",
    "MILBagDataset",
    "MILLoss",
    "prepare_bag_batch",
    "pretrain_slices",
    "select_thresholds",
    "balanced_subset",
    "merge_pools",
    "negative_series",
    "finish_training",
    "binary_metrics",
    "VolumeDetectorRunner",
    "evaluate_ct_dicom",
    "save_state_dict_fp16",
    "load_state_dict_fp16",
]

VOLUME_WINDOW = (-950.0, 150.0)
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
    img = _TONE(HUWindow(window[0], window[1])(torch.as_tensor(np.ascontiguousarray(hu), dtype=torch.float32)))
    return _resize_pair(img, torch.as_tensor(np.ascontiguousarray(lung)), size)


def _fallback_mask(u8: np.ndarray) -> np.ndarray:
    m = ndi.binary_opening(u8 < 128, iterations=2)
    m = ndi.binary_fill_holes(m)
    labels, n = ndi.label(m)
    if n == 0:
        return np.ones_like(m)
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.argsort(sizes)[::-1][:2] + 1
    return ndi.binary_dilation(np.isin(labels, keep), iterations=2)


def preprocess_slice_8bit(u8: np.ndarray, size: int = 128) -> torch.Tensor:
    """A windowed 8-bit CT slice (y, x) (e.g. ``ct_slices_cls``) -> (2, size, size) float32 (image, lung mask)."""
    from data_prep.lung import lung_mask

    a = np.asarray(u8, dtype=np.float32)
    if a.ndim == 3:
        a = a[..., 0]
    lo, hi = float(a.min()), float(a.max())
    img = (a - lo) / max(hi - lo, 1.0)
    try:
        mask = lung_mask(-1200.0 + 1200.0 * a / 255.0)
    except Exception:  # the fallback below is the documented behaviour for odd screenshots
        mask = np.zeros(a.shape, bool)
    if mask.sum() < 0.02 * mask.size:
        mask = _fallback_mask(a)
    img_t = _TONE(torch.as_tensor(img))
    return _resize_pair(img_t[None], torch.as_tensor(mask)[None], size)[0]


# ------------------------------------------------------------------------------------------------------ inference


@torch.no_grad()
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


class SlicePool:
    """Pre-processed training slices: 2D labelled slices and real series (kept in memory as float16).

    ``sources``: name -> dict(x (N, 2, s, s) tensor, slice_labels (N,) int tensor with -1 = unknown,
    volume_label int or None, ordered bool (a real series in axial order)).
    """

    def __init__(self, sources: dict[str, dict[str, Any]]) -> None:
        self.sources = sources

    @classmethod
    def build(
        cls,
        slices: Sequence[dict[str, Any]] = (),
        series: Sequence[dict[str, Any]] = (),
        size: int = 128,
        use_slice_labels_of: Sequence[str] = (),
        max_series_slices: int | None = None,
        verbose: bool = True,
    ) -> SlicePool:
        """``slices``: items with ``image`` (8-bit PNG) and ``label`` 0/1 (``ct_slices_cls_datalist``).
        ``series``: items of ``ct_dicom_datalist``; their slice labels are used only for series named in
        ``use_slice_labels_of`` (never P001 in training) -- others get -1 (unknown) unless the volume is negative,
        in which case every slice is negative by definition.
        """
        from PIL import Image

        from data_prep.io import read_volume
        from data_prep.lung import lung_mask

        t0 = time.time()
        sources: dict[str, dict[str, Any]] = {}
        for label in (0, 1):
            items = [d for d in slices if int(d["label"]) == label]
            if items:
                x = torch.stack([preprocess_slice_8bit(np.asarray(Image.open(d["image"]).convert("L")), size) for d in items])
                sources[f"slices_{label}"] = {
                    "x": x.half(),
                    "slice_labels": torch.full((len(items),), label, dtype=torch.long),
                    "volume_label": None,
                    "ordered": False,
                }
        for d in series:
            vol = read_volume(d["image"])
            lung = lung_mask(vol.array, vol.spacing)
            x = preprocess_volume(vol.array, lung, size=size)
            if max_series_slices:
                x = x[:max_series_slices]
            n = x.shape[0]
            if d["series_id"] in use_slice_labels_of:
                lab = torch.tensor([int(d["slice_labels"].get(i, 0)) for i in vol.instance_numbers[:n]])
            elif int(d["label"]) == 0:
                lab = torch.zeros(n, dtype=torch.long)
            else:
                lab = torch.full((n,), -1, dtype=torch.long)
            sources[d["series_id"]] = {"x": x.half(), "slice_labels": lab, "volume_label": int(d["label"]), "ordered": True}
        if verbose:
            counts = ", ".join(f"{k}={v['x'].shape[0]}" for k, v in sources.items())
            print(f"SlicePool: {counts} ({time.time() - t0:.0f} s)")
        return cls(sources)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Left-right flip and a random gamma on the image channel (same for the whole bag), (N, 2, s, s)."""
    if torch.rand(1, generator=gen).item() < 0.5:
        x = x.flip(-1)
    gamma = float(torch.empty(1).uniform_(0.8, 1.25, generator=gen))
    img = x[:, :1].clamp(0, 1) ** gamma
    return torch.cat([img, x[:, 1:]], dim=1)


class MILBagDataset(torch.utils.data.Dataset):
    """Bags of slices for multiple-instance training; item ``{"image": (N, 2, s, s), "label": 0/1, "slice_labels": (N,)}``.

    ``n_bags`` bags per epoch cycle through these kinds (deterministic given ``seed``, epoch and index):

    - ``series``: up to ``max_slices`` random slices (kept in axial order) of a real series, the volume label;
    - ``slices``: ``max_slices`` 2D labelled slices, positive if any is COVID (positives hold 20-80 % COVID slices);
    - ``hybrid``: a contiguous run of a negative real series with 2D slices inserted (COVID ones for a positive bag),
      so that both image sources occur in bags of both labels and the source cannot stand in for the label.

    ``enhance`` (a callable on (C, H, W) numpy, e.g. ``StochasticEnhance``) is applied to the image channel of a
    slice with probability ``enhance_prob`` (optional augmentation; off by default). With ``fixed=True`` item ``i`` is
    always the same bag (validation); otherwise every draw is a new bag (read with ``num_workers=0``).
    """

    def __init__(
        self,
        pool: SlicePool,
        n_bags: int = 24,
        max_slices: int = 32,
        seed: int = 0,
        augment: bool = True,
        enhance: Callable | None = None,
        enhance_prob: float = 0.0,
        fixed: bool = False,
    ) -> None:
        self.pool = pool
        self.n_bags = n_bags
        self.max_slices = max_slices
        self.seed = seed
        self.augment = augment
        self.enhance = enhance
        self.enhance_prob = enhance_prob
        self.fixed = fixed
        self._draws = 0
        src = pool.sources
        self.series = [k for k, v in src.items() if v["ordered"]]
        self.neg_series = [k for k in self.series if src[k]["volume_label"] == 0]
        self.has_slices = "slices_0" in src and "slices_1" in src
        kinds: list[tuple[str, Any]] = [("series", k) for k in self.series]
        if self.has_slices:
            kinds += [("slices", 1), ("slices", 0)]
            if self.neg_series:
                kinds += [("hybrid", 1), ("hybrid", 0)]
        if not kinds:
            raise ValueError("MILBagDataset needs a real series or 2D slices of both classes")
        self.kinds = kinds

    def __len__(self) -> int:
        return self.n_bags

    def _take(self, name: str, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.pool.sources[name]
        return s["x"][idx].float(), s["slice_labels"][idx]

    def __getitem__(self, index: int) -> dict[str, Any]:
        # training: a new bag at every draw (deterministic sequence for a seed); validation (fixed): one bag per index
        draw = index if self.fixed else self._draws
        self._draws += 1
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + draw)
        kind, arg = self.kinds[index % len(self.kinds)]
        src = self.pool.sources
        n = self.max_slices
        if kind == "series":
            total = src[arg]["x"].shape[0]
            idx = torch.randperm(total, generator=gen)[: min(n, total)].sort().values
            x, lab = self._take(arg, idx)
            label = src[arg]["volume_label"]
        elif kind == "slices":
            label = arg
            n_pos = int(torch.randint(max(1, n // 5), max(2, 4 * n // 5), (1,), generator=gen)) if label else 0
            p = torch.randint(0, src["slices_1"]["x"].shape[0], (n_pos,), generator=gen)
            q = torch.randint(0, src["slices_0"]["x"].shape[0], (n - n_pos,), generator=gen)
            xp, lp = self._take("slices_1", p)
            xq, lq = self._take("slices_0", q)
            perm = torch.randperm(n, generator=gen)
            x, lab = torch.cat([xp, xq])[perm], torch.cat([lp, lq])[perm]
        else:  # hybrid
            label = arg
            name = self.neg_series[int(torch.randint(0, len(self.neg_series), (1,), generator=gen))]
            total = src[name]["x"].shape[0]
            run = min(n, total)
            start = int(torch.randint(0, total - run + 1, (1,), generator=gen))
            x, lab = self._take(name, torch.arange(start, start + run))
            n_ins = int(torch.randint(max(1, run // 5), max(2, run // 2), (1,), generator=gen))
            pos = torch.randperm(run, generator=gen)[:n_ins]
            pick_from = "slices_1" if label else "slices_0"
            k = torch.randint(0, src[pick_from]["x"].shape[0], (n_ins,), generator=gen)
            xi, li = self._take(pick_from, k)
            x, lab = x.clone(), lab.clone()
            x[pos], lab[pos] = xi, li
        if self.augment:
            x = _augment(x, gen)
        if self.enhance is not None and self.enhance_prob > 0:
            for i in range(x.shape[0]):
                if torch.rand(1, generator=gen).item() < self.enhance_prob:
                    x[i, :1] = torch.as_tensor(self.enhance(x[i, :1].numpy()))
        return {"image": x, "label": torch.tensor(label, dtype=torch.long), "slice_labels": lab}


def prepare_bag_batch(batchdata: dict[str, Any], device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any):
    """``prepare_batch`` for MONAI engines: (image (B, N, 2, s, s), target dict) so the loss sees slice labels."""
    image = batchdata["image"].to(device, non_blocking=non_blocking)
    target = {
        "label": batchdata["label"].to(device, non_blocking=non_blocking),
        "slice_labels": batchdata["slice_labels"].to(device, non_blocking=non_blocking),
    }
    return image, target


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


def pretrain_slices(
    net: nn.Module,
    pool: SlicePool,
    epochs: int = 6,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> list[float]:
    """Stage 1: train encoder + head on labelled single slices (2D slices and negative-series slices).

    Each slice is a sequence of length 1 through the whole network; loss BCE on its slice score. BN in train mode.
    Returns the mean loss per epoch.
    """
    xs, ys = [], []
    for s in pool.sources.values():
        known = s["slice_labels"] >= 0
        xs.append(s["x"][known])
        ys.append(s["slice_labels"][known])
    x_all, y_all = torch.cat(xs), torch.cat(ys).float()
    # balance the classes by weighting
    pos_frac = float(y_all.mean())
    w_pos, w_neg = 0.5 / max(pos_frac, 1e-3), 0.5 / max(1 - pos_frac, 1e-3)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.to(device).train()
    history = []
    for ep in range(epochs):
        perm = torch.randperm(len(y_all), generator=gen)
        tot, cnt = 0.0, 0
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            x = _augment(x_all[idx].float(), gen).to(device)
            y = y_all[idx].to(device)
            _, _, scores = net(x[:, None])
            w = torch.where(y > 0.5, w_pos, w_neg)
            loss = F.binary_cross_entropy(scores[:, 0].clamp(1e-6, 1 - 1e-6), y, weight=w)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
            cnt += len(idx)
        history.append(tot / cnt)
        print(f"pretrain epoch {ep + 1}/{epochs}: loss {history[-1]:.4f}", flush=True)
    return history


def balanced_subset(items: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """At most ``n`` items, half of each ``label`` (0/1), in the given order."""
    return [d for d in items if int(d["label"]) == 1][: n // 2] + [d for d in items if int(d["label"]) == 0][: n - n // 2]


def merge_pools(*pools: SlicePool) -> SlicePool:
    """One pool with the sources of all (later names win)."""
    sources: dict[str, dict[str, Any]] = {}
    for p in pools:
        sources.update(p.sources)
    return SlicePool(sources)


def negative_series(pool: SlicePool) -> SlicePool:
    """The real negative series of a pool (shared with a validation pool without re-reading DICOM)."""
    return SlicePool({k: v for k, v in pool.sources.items() if v["ordered"] and v["volume_label"] == 0})


def finish_training(
    network: nn.Module, val_dataset: MILBagDataset, model_path: str | os.PathLike, summary_path: str | os.PathLike
) -> dict[str, Any]:
    """Choose thresholds on the validation bags, save fp16 weights and a JSON summary (thresholds, metrics)."""
    from monai_covid.io_utils import atomic_write_json

    summary = select_thresholds(network, val_dataset)
    save_state_dict_fp16(network, model_path)
    atomic_write_json(summary_path, summary)
    print(f"thresholds: {summary}", flush=True)
    return summary


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


@torch.no_grad()
def select_thresholds(net: nn.Module, dataset: MILBagDataset, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Slice threshold maximising slice F1 on validation bags (known slice labels); volume threshold 0.5 unless
    the validation bags need another one to be all right (midpoint between the classes)."""
    net.eval()
    scores, labels, vprob, vlab = [], [], [], []
    for i in range(len(dataset)):
        item = dataset[i]
        logits, _, s = net(item["image"][None].to(device))
        known = item["slice_labels"] >= 0
        scores.append(s[0].cpu()[known])
        labels.append(item["slice_labels"][known])
        vprob.append(float(torch.softmax(logits, -1)[0, 1]))
        vlab.append(int(item["label"]))
    s, y = torch.cat(scores).numpy(), torch.cat(labels).numpy()
    best = (0.5, -1.0)
    for t in np.linspace(0.05, 0.95, 91):
        f1 = binary_metrics(y, s >= t)["F1"]
        if not math.isnan(f1) and f1 > best[1] + 1e-9:
            best = (float(t), f1)
    vprob_a, vlab_a = np.asarray(vprob), np.asarray(vlab)
    vol_t = 0.5
    if (vlab_a == 1).any() and (vlab_a == 0).any():
        lo, hi = vprob_a[vlab_a == 0].max(), vprob_a[vlab_a == 1].min()
        if not (lo < 0.5 <= hi) and lo < hi:
            vol_t = float((lo + hi) / 2)
    return {
        "slice_threshold": round(best[0], 3),
        "slice_f1_val": best[1],
        "volume_threshold": round(vol_t, 4),
        "volume_metrics_val": binary_metrics(vlab_a, vprob_a >= vol_t),
        "n_val_slices": int(len(y)),
        "n_val_bags": len(vlab),
    }


# ------------------------------------------------------------------------------------------------------ reports


def _slice_png(path: Path, scores: np.ndarray, inputs: torch.Tensor, threshold: float, title: str, n_top: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from monai_covid.io_utils import atomic_write_bytes

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
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


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
