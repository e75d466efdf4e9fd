"""Figure of the second training source (``extra_source``, ``data_prep.datalists.ct_slices_extra_datalist``): two
slices of each kind as stored (top) and as the network sees them after the lung-box crop and histogram equalisation
of the shipped input (bottom), next to one SARS-CoV-2 slice of each class. No model is used.

    python bundles/covid_ct_slice_ctnet/scripts/extra_source_figure.py --data ../shared/data \
        --out bundles/covid_ct_slice_ctnet/docs/figures/extra_source.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from data_prep import datalists  # noqa: E402
from data_prep.slice_crop import lung_box_8bit  # noqa: E402


def _model_view(a: np.ndarray) -> np.ndarray:
    """Lung-box crop, then per-image histogram equalisation (``monai.transforms.HistogramNormalize``, 256 bins)."""
    from monai.transforms import HistogramNormalize

    y0, y1, x0, x1 = lung_box_8bit(a)
    crop = a[y0:y1, x0:x1].astype(np.float32) / 255.0
    return np.asarray(HistogramNormalize(num_bins=256, min=0.0, max=1.0)(crop[None]))[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="bundles/covid_ct_slice_ctnet/docs/figures/extra_source.png")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extra = datalists.ct_slices_extra_datalist(args.data)
    sars = datalists.ct_slices_cls_grouped_datalist(args.data)

    def pick(items, pred, k):
        chosen = [d for d in items if pred(d)]
        return [chosen[i] for i in np.linspace(0, len(chosen) - 1, k + 2).round().astype(int)[1:-1]]

    cols = [
        ("SARS-CoV-2 COVID", pick(sars, lambda d: d["label"] == 1, 1)),
        ("SARS-CoV-2 non-COVID", pick(sars, lambda d: d["label"] == 0, 1)),
        ("MedSeg (COVID)", pick(extra, lambda d: d["group"].startswith("medseg:"), 1)),
        ("coronacases (COVID)", pick(extra, lambda d: "coronacases" in d["group"], 1)),
        ("Radiopaedia (COVID)", pick(extra, lambda d: "radiopaedia" in d["group"], 1)),
        ("P001, infection", pick(extra, lambda d: d["group"] == "ctmd:P001" and d["label"] == 1, 1)),
        ("P001, none", pick(extra, lambda d: d["group"] == "ctmd:P001" and d["label"] == 0, 1)),
        ("normal001", pick(extra, lambda d: d["group"] == "ctmd:normal001", 1)),
    ]
    fig, axes = plt.subplots(2, len(cols), figsize=(2.2 * len(cols), 4.8))
    for c, (name, (item,)) in enumerate(cols):
        with Image.open(item["image"]) as im:
            a = np.asarray(im.convert("L"))
        axes[0, c].imshow(a, cmap="gray", vmin=0, vmax=255)
        axes[0, c].set_title(name, fontsize=8)
        axes[1, c].imshow(_model_view(a), cmap="gray", vmin=0, vmax=1)
        for r in (0, 1):
            axes[r, c].axis("off")
    axes[0, 0].text(-0.08, 0.5, "as stored", transform=axes[0, 0].transAxes, rotation=90, va="center", ha="right")
    axes[1, 0].text(-0.08, 0.5, "network input", transform=axes[1, 0].transAxes, rotation=90, va="center", ha="right")
    fig.suptitle("second training source (extra_source) next to the SARS-CoV-2 classes; lung crop + equalisation below")
    plt.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=70)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
