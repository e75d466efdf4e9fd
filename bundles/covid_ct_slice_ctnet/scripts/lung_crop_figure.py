"""Figure of the lung-box crop (``data_prep.slice_crop``) on SARS-CoV-2 and UCSD val images, and the share of each
image the box keeps, per set. No labels or models are used.

    python bundles/covid_ct_slice_ctnet/scripts/lung_crop_figure.py --data ../shared/data \
        --out docs/figures/slice_lung_crop.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from data_prep.slice_crop import lung_box_8bit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="docs/figures/slice_lung_crop.png")
    ap.add_argument("--per_row", type=int, default=6)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = Path(args.data)

    def images(folder: Path) -> list[Path]:
        return sorted(p for p in folder.glob("*/*") if p.suffix.lower() in (".png", ".jpg"))

    sets = {
        "SARS-CoV-2 CT-scan": images(data / "ct_slices_cls"),
        "UCSD COVID-CT val": images(data / "ct_slices_ucsd" / "val"),
    }
    fig, axes = plt.subplots(len(sets), args.per_row, figsize=(2.6 * args.per_row, 2.9 * len(sets)))
    for r, (name, files) in enumerate(sets.items()):
        kept = []
        for p in files:
            with Image.open(p) as im:
                a = np.asarray(im.convert("L"), dtype=np.float32)
            y0, y1, x0, x1 = lung_box_8bit(a)
            kept.append((y1 - y0) * (x1 - x0) / a.size)
        kept = np.asarray(kept)
        med, p5 = np.median(kept), np.percentile(kept, 5)
        print(f"{name}: N = {len(files)}, box keeps median {med:.2f} of the image (5th pct {p5:.2f})")
        # a fixed pick: evenly spaced over the sorted file list
        for c, i in enumerate(np.linspace(0, len(files) - 1, args.per_row).round().astype(int)):
            with Image.open(files[i]) as im:
                a = np.asarray(im.convert("L"))
            y0, y1, x0, x1 = lung_box_8bit(a)
            ax = axes[r, c]
            ax.imshow(a, cmap="gray")
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="yellow", lw=1.5))
            ax.set_title(f"{a.shape[1]}x{a.shape[0]}, keeps {kept[i]:.0%}", fontsize=8)
            ax.axis("off")
        axes[r, 0].text(
            -0.1, 0.5, name, transform=axes[r, 0].transAxes, rotation=90, va="center", ha="right", fontsize=10
        )
    fig.suptitle("lung-box crop (yellow) before equalisation; median share kept: see the script's output", fontsize=10)
    plt.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=70)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
