"""Shortcut check: how well do whole-image grey statistics, with no pathology in them, separate COVID from
non-COVID in the training set (SARS-CoV-2 CT-scan, ``ct_slices_cls``) and in UCSD COVID-CT val?

A statistic with ROC AUC far from 0.5 in the training set is a cue a network can learn instead of the lung
pattern; if its AUC is on the other side of 0.5 in a second source, that network ranks the second source backwards.
AUC > 0.5: the statistic is higher in COVID images. Nothing is trained or chosen here.

Usage (repository root): ``python bundles/covid_ct_slice_ctnet/scripts/grey_statistics.py ../shared/data [OUT.md]``
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.datalists import ct_slices_cls_datalist, ct_slices_ucsd_datalist
from monai_covid.threshold_analysis import roc_auc


def statistics(path: str | Path) -> dict[str, float]:
    """Grey statistics of one image (8-bit grey after PIL's ``convert("L")``)."""
    with Image.open(path) as im:
        a = np.asarray(im.convert("L"), dtype=np.float32)
    h, w = a.shape
    return {
        "width (px)": w,
        "height (px)": h,
        "mean grey": float(a.mean()),
        "grey std (contrast)": float(a.std()),
        "median grey": float(np.median(a)),
        "mean of the central half": float(a[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].mean()),
        "95th percentile": float(np.percentile(a, 95)),
        "5th percentile": float(np.percentile(a, 5)),
    }


def table(data_dir: str | Path) -> str:
    sets = {
        "SARS-CoV-2 (training source)": ct_slices_cls_datalist(data_dir),
        "UCSD val (other source)": ct_slices_ucsd_datalist(data_dir),
    }
    stats = {name: [statistics(d["image"]) for d in items] for name, items in sets.items()}
    labels = {name: np.array([int(d["label"]) for d in items]) for name, items in sets.items()}
    names = list(next(iter(stats.values()))[0])
    head = " | ".join(f"{s}: AUC (COVID / non-COVID mean)" for s in sets)
    lines = [f"| statistic | {head} |", "|---|" + "---|" * len(sets)]
    for n in names:
        cells = []
        for s in sets:
            v, y = np.array([r[n] for r in stats[s]]), labels[s]
            cells.append(f"{roc_auc(y, v):.3f} ({v[y == 1].mean():.1f} / {v[y == 0].mean():.1f})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    ns = ", ".join(f"{s}: N = {len(labels[s])} ({int(labels[s].sum())} COVID)" for s in sets)
    return "\n".join(lines) + f"\n\n{ns}. AUC > 0.5: higher in COVID images.\n"


if __name__ == "__main__":
    out = table(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
    print(out)
    if len(sys.argv) > 2:
        from monai_covid.io_utils import atomic_write_text

        atomic_write_text(sys.argv[2], out)
