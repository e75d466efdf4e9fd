"""Figure and counts behind the near-duplicate threshold of ``ct_slices_cls_grouped`` (docs/README.md).

python bundles/covid_ct_slice_ctnet/scripts/near_duplicate_scores.py ../shared/data \
    bundles/covid_ct_slice_ctnet/docs/evaluation
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from data_prep import near_duplicates as nd
from data_prep.datalists import ct_slices_cls_datalist, ct_slices_ucsd_datalist


def main(data_dir: str, out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    items = ct_slices_cls_datalist(data_dir)
    y = np.array([d["label"] for d in items])
    s = nd.ncc_matrix(nd.thumbnails([d["image"] for d in items]))
    iu = np.triu_indices(len(items), 1)
    same = (y[:, None] == y[None, :])[iu]
    ucsd = ct_slices_ucsd_datalist(data_dir)
    pid = np.array([d["group"] for d in ucsd])
    su = nd.ncc_matrix(nd.thumbnails([d["image"] for d in ucsd]))
    iu2 = np.triu_indices(len(ucsd), 1)
    same_pid = (pid[:, None] == pid[None, :])[iu2]
    rows = []
    for t in (0.80, 0.85, 0.88, 0.90, 0.92, 0.95):
        g = nd.group_near_duplicates(s, t)
        info = nd.describe_groups(g, y.tolist())
        rows.append(
            {
                "threshold": t,
                "groups": info["groups"],
                "singletons": info["singletons"],
                "largest": info["largest"],
                "mixed_class_groups": info["mixed_class_groups"],
                "same_class_pairs_at_or_above": int(((s[iu] >= t) & same).sum()),
                "cross_class_pairs_at_or_above": int(((s[iu] >= t) & ~same).sum()),
            }
        )
    (out / "near_duplicate_thresholds.json").write_text(json.dumps(rows, indent=1) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    bins = np.linspace(-0.2, 1, 61)
    axes[0].hist(
        s[iu][~same],
        bins,
        density=True,
        alpha=0.6,
        label=f"COVID vs non-COVID pairs (different patients), n={int((~same).sum())}",
    )
    axes[0].hist(s[iu][same], bins, density=True, alpha=0.6, label=f"same-class pairs, n={int(same.sum())}")
    axes[0].axvline(nd.DEFAULT_NCC_THRESHOLD, color="k", ls="--", lw=1)
    axes[0].set(
        yscale="log",
        xlabel="NCC of 64x64 thumbnails",
        ylabel="density (log)",
        title="SARS-CoV-2 CT-scan subset (300 slices)",
    )
    axes[0].legend(fontsize=7)
    axes[1].hist(
        su[iu2][~same_pid], bins, density=True, alpha=0.6, label=f"between patients, n={int((~same_pid).sum())}"
    )
    axes[1].hist(su[iu2][same_pid], bins, density=True, alpha=0.6, label=f"within a patient, n={int(same_pid.sum())}")
    axes[1].axvline(nd.DEFAULT_NCC_THRESHOLD, color="k", ls="--", lw=1)
    axes[1].set(
        xlabel="NCC of 64x64 thumbnails", ylabel="density", title="UCSD COVID-CT val (116 figures, 55 patients)"
    )
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(out / "near_duplicate_scores.png", dpi=110)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
