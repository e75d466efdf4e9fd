"""Overlays of the semi-supervised CV runs for docs/cv_semi/overlays_semi.png (bundle-specific glue).

    python bundles/covid_ct_lesion_asegnet/scripts/semi_overlays.py --cv_dir /tmp/18/cv_asegnet

Top: a held-out doctor slice of fold 0 segmented by the fold-0 fine-tuned A-SegNet and MONAI UNet (red prediction,
green radiologist contour). Bottom: a slice of a held-out pseudo-label patient segmented by the pre-trained
networks (green: pseudo-label >= 128 of 255).
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import torch
from make_figures import _overlay  # same drawing as the shipped figures
from PIL import Image

BUNDLE = Path(__file__).resolve().parents[1]
REPO = BUNDLE.parents[1]


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from data_prep.datalists import make_datalist
    from monai_covid.crossval import LABELS, load_run
    from monai_covid.inference.lesion import segment_slices
    from monai_covid.io_utils import atomic_write_bytes

    p = argparse.ArgumentParser()
    p.add_argument("--cv_dir", type=Path, required=True)
    p.add_argument("--variants", nargs="+", default=["asegnet", "unet"])
    p.add_argument("--image", default="10.jpg", help="held-out doctor slice of fold 0")
    p.add_argument("--pseudo_index", type=int, default=120, help="index into the held-out pseudo-label slices")
    p.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data"))
    a = p.parse_args()
    torch.set_num_threads(1)

    doc = next(
        d for d in make_datalist("ct_lesion_slices", a.data_dir, fold=0, part="val") if Path(d["image"]).name == a.image
    )
    pse = make_datalist("ct_lesion_pseudo", a.data_dir, part="val")[a.pseudo_index]
    rows = []
    for item, stage, run in ((doc, "fine-tuned fold 0", "fold0"), (pse, "pre-trained", "pretrain")):
        img = np.asarray(Image.open(item["image"]).convert("L"), dtype=np.float32) / 255.0
        lab = np.asarray(Image.open(item["label"]).convert("L")) >= 128
        row = []
        for v in a.variants:
            run_dir = a.cv_dir / v / run
            net = load_run(BUNDLE, run_dir, json.loads((run_dir / "overrides.json").read_text()), "final")
            pred = segment_slices(net, [img])[0]
            dice = 2 * np.count_nonzero(pred & lab) / max(1, np.count_nonzero(pred) + np.count_nonzero(lab))
            row.append(
                (
                    _overlay(img, pred, lab),
                    f"{LABELS[v].split(' +')[0]}, {stage}\n{Path(item['image']).name[:40]}: Dice {dice:.2f}",
                )
            )
        rows.append(row)
    fig, axes = plt.subplots(len(rows), len(a.variants), figsize=(3.4 * len(a.variants), 3.5 * len(rows)), dpi=80)
    for r, row in enumerate(rows):
        for c, (im, title) in enumerate(row):
            axes[r][c].imshow(im)
            axes[r][c].set_title(title, fontsize=7)
            axes[r][c].axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(BUNDLE / "docs" / "cv_semi" / "overlays_semi.png", buf.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
