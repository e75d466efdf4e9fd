"""Figures and timings for this bundle's docs/README.md (bundle-specific glue, not library code).

    python bundles/covid_ct_lesion_asegnet/scripts/make_figures.py --cv_dir /tmp/asegnet_cv --fold 0

Writes docs/overlays.png (a CV held-out slice segmented by the model of the fold that did not see it; a real CT
slice of P001 segmented by the shipped model), docs/intensity_window.png (grey-level histograms that justify the
HU window) and docs/timing.json (CPU inference time per 512x512 slice, lung mask time, threads).

The other CT lesion bundle, which shares this bundle's data, folds and inference path, gets the same overlay figure
and timing (not the histogram, which justifies the HU window both use)::

    python bundles/covid_ct_lesion_asegnet/scripts/make_figures.py --bundle bundles/covid_ct_lesion_cosup_resunet \
        --variant cosup --cv_dir /tmp/cosup_cv --fold 0
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

BUNDLE = Path(__file__).resolve().parents[1]
REPO = BUNDLE.parents[1]


def _contour(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    return mask & ~ndi.binary_erosion(mask, iterations=2)


def _overlay(gray01: np.ndarray, pred: np.ndarray, label: np.ndarray | None = None) -> np.ndarray:
    rgb = np.repeat((np.clip(gray01, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2).astype(np.float32)
    p = pred > 0
    rgb[p] = 0.55 * rgb[p] + 0.45 * np.array([255, 40, 40])
    if label is not None:
        rgb[_contour(label > 0)] = [40, 255, 40]
    return rgb.astype(np.uint8)


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from data_prep.datalists import make_datalist
    from data_prep.intensity import HUWindow
    from data_prep.io import read_volume
    from data_prep.lung import lung_mask
    from monai_covid.crossval import _network_from_overrides
    from monai_covid.inference.lesion import HU_WINDOW, load_bundle_network, segment_slices, segment_volume
    from monai_covid.io_utils import atomic_write_bytes, atomic_write_text

    p = argparse.ArgumentParser()
    p.add_argument("--bundle", type=Path, default=BUNDLE, help="CT lesion bundle (default: this one)")
    p.add_argument("--variant", default="asegnet", help="CV variant whose fold model is shown")
    p.add_argument("--cv_dir", type=Path, default=Path("/tmp/asegnet_cv"))
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--checkpoint", default="model.pt", help="file of the fold run (model_final.pt: fixed-epoch CV)")
    p.add_argument("--image", default="10.jpg", help="held-out slice of --fold to show")
    p.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--ct", default=None, help="DICOM series folder (default: ct_dicom/P001)")
    p.add_argument("--ct_slice", type=int, default=100)
    a = p.parse_args()
    torch.set_num_threads(1)
    bundle = a.bundle.resolve()
    docs = bundle / "docs"
    # the bundle's lesion probability cut (inference.json "threshold"), as monai-covid infer applies it
    thr = float(json.loads((bundle / "configs" / "inference.json").read_text()).get("threshold", 0.5))

    # (a) held-out slice, model of the fold that did not see it
    val = make_datalist("ct_lesion_slices", a.data_dir, fold=a.fold, part="val")
    item = next(d for d in val if Path(d["image"]).name == a.image)
    run_dir = a.cv_dir / a.variant / f"fold{a.fold}"
    fold_net = _network_from_overrides(bundle, json.loads((run_dir / "overrides.json").read_text()))
    fold_net.load_state_dict(torch.load(run_dir / a.checkpoint, weights_only=True))
    fold_net.eval()
    img = np.asarray(Image.open(item["image"]).convert("L"), dtype=np.float32) / 255.0
    label = np.asarray(Image.open(item["label"]).convert("L")) > 127
    pred = segment_slices(fold_net, [img], threshold=thr)[0]
    dice = 2 * np.count_nonzero(pred & label) / max(1, np.count_nonzero(pred) + np.count_nonzero(label))

    # (b) real CT in HU, shipped model, whole volume (timed)
    net = load_bundle_network(bundle)
    vol = read_volume(a.ct or Path(a.data_dir) / "ct_dicom" / "P001")
    t0 = time.perf_counter()
    lung = lung_mask(vol.array, vol.spacing)
    t_lung = time.perf_counter() - t0
    segment_volume(net, vol.array[:4], lung[:4], threshold=thr)  # warm-up
    t0 = time.perf_counter()
    seg = segment_volume(net, vol.array, lung, batch_size=8, threshold=thr)
    t_seg = time.perf_counter() - t0
    n, ny, nx = vol.array.shape
    timing = {
        "volume": str(vol.source),
        "shape_zyx": [n, ny, nx],
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "lung_mask_s": round(t_lung, 2),
        "segment_volume_s": round(t_seg, 2),
        "ms_per_slice": round(1000 * t_seg / n, 1),
        "lesion_percent_of_lung": round(100 * float(seg.sum()) / max(1, int(lung.sum())), 2),
        "threshold": thr,
        "note": "segment_volume: HU window, lung-box crop, resize to 256x256, network, resize back, lung masking",
    }
    atomic_write_text(docs / "timing.json", json.dumps(timing, indent=1) + "\n")
    z = a.ct_slice
    ct01 = np.asarray(HUWindow(*HU_WINDOW)(vol.array[z]))

    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.6), dpi=80)
    axes[0].imshow(_overlay(img, pred, label))
    title0 = f"held-out {a.image} (fold {a.fold} model, p > {thr:g})\nDice {dice:.2f}; red pred, green truth"
    axes[0].set_title(title0, fontsize=8)
    axes[1].imshow(_overlay(ct01, seg[z]))
    title1 = f"P001 slice {z} (HU window {HU_WINDOW[0]:.0f}..{HU_WINDOW[1]:.0f})\nshipped model, p > {thr:g}"
    axes[1].set_title(title1, fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(docs / "overlays.png", buf.getvalue())
    if bundle != BUNDLE:
        print(json.dumps(timing, indent=1))
        return 0

    # histogram: training slices vs the CT crop to the lungs, under two windows
    import glob

    jpg = np.concatenate(
        [
            np.asarray(Image.open(f).convert("L")).ravel()
            for f in glob.glob(str(Path(a.data_dir) / "ct_lesion_slices/train/images/*.jpg"))
        ]
    )
    ys, xs = np.nonzero(lung.any(axis=0))
    crop = vol.array[:, ys.min() : ys.max() + 1, xs.min() : xs.max() + 1][lung.any(axis=(1, 2))][::3].ravel()
    fig, ax = plt.subplots(figsize=(5, 2.6), dpi=80)
    bins = np.arange(0, 257, 4)
    ax.hist(jpg, bins=bins, density=True, histtype="step", color="k", label="training slices (8-bit)")
    for lo, hi, c in ((HU_WINDOW[0], HU_WINDOW[1], "r"), (-1024, 600, "b")):
        ax.hist(
            np.clip((crop - lo) / (hi - lo), 0, 1) * 255,
            bins=bins,
            density=True,
            histtype="step",
            color=c,
            label=f"P001 HU [{lo:.0f}, {hi:.0f}]",
        )
    ax.set_xlabel("grey level (0-255)", fontsize=8)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(docs / "intensity_window.png", buf.getvalue())
    print(json.dumps(timing, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
