"""The table behind the near-duplicate threshold of the chest X-ray set (``cxr_infection``, issue 19).

For each candidate threshold of the 64x64 thumbnail NCC (``data_prep.near_duplicates``): how many pairs of X-rays
of *different* patients reach it (COVID-19 vs Non-COVID or Normal: the chance rate of that score), how many pairs
within each class reach it (and how many of those chance alone would give at that rate), and the groups that
single linkage makes of it (number, largest, groups with more than one class)::

    python -m data_prep.cxr_grouping_report ../shared/data [--thresholds 0.90 0.92 0.93 0.94 0.95 0.97]

The chosen threshold is :data:`data_prep.datalists.CXR_NCC_THRESHOLD`; the table and the reasoning are in
``bundles/covid_cxr_infection_map_unet/docs/README.md`` ("v3 plan / status").
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["threshold_table", "main"]


def threshold_table(
    scores: np.ndarray, classes: Sequence[str], thresholds: Sequence[float], positive: str = "covid"
) -> list[dict[str, Any]]:
    """One row per threshold from a square pair-score matrix and each item's class (see the module docstring)."""
    from data_prep import near_duplicates as nd

    cls = np.asarray(classes)
    iu = np.triu_indices(len(cls), 1)
    s = np.asarray(scores)[iu]
    a, b = cls[iu[0]], cls[iu[1]]
    different = (a == positive) != (b == positive)
    n_diff = max(int(different.sum()), 1)
    rows = []
    for t in thresholds:
        rate = float((s[different] >= t).sum()) / n_diff
        row: dict[str, Any] = {
            "threshold": t,
            "different_pairs": int(different.sum()),
            "different_pairs_at_or_above": int((s[different] >= t).sum()),
        }
        for c in sorted(set(cls.tolist())):
            within = (a == c) & (b == c)
            row[f"{c}_pairs_at_or_above"] = int((s[within] >= t).sum())
            row[f"{c}_chance"] = rate * int(within.sum())
        d = nd.describe_groups(nd.group_near_duplicates(scores, t), list(cls))
        row.update(
            groups=d["groups"],
            largest=d["largest"],
            singletons=d["singletons"],
            mixed_class_groups=d["mixed_class_groups"],
        )
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    from data_prep import near_duplicates as nd
    from data_prep.datalists import _natural_key, cxr_infection_datalist

    p = argparse.ArgumentParser(prog="python -m data_prep.cxr_grouping_report", description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir", type=Path)
    p.add_argument("--thresholds", nargs="+", type=float, default=[0.90, 0.92, 0.93, 0.94, 0.95, 0.97])
    a = p.parse_args(argv)
    items = sorted(
        cxr_infection_datalist(a.data_dir), key=lambda d: (d["class_name"], _natural_key(os.path.basename(d["image"])))
    )
    scores = nd.ncc_matrix(nd.thumbnails([d["image"] for d in items]))
    rows = threshold_table(scores, [d["class_name"] for d in items], a.thresholds)
    classes = sorted({d["class_name"] for d in items})
    print(
        "| NCC >= | different-patient pairs >= | "
        + " | ".join(f"{c} pairs (chance)" for c in classes)
        + " | groups | largest | mixed-class groups |"
    )
    print("|---|---|" + "---|" * len(classes) + "---|---|---|")
    for r in rows:
        print(
            f"| {r['threshold']:.2f} | {r['different_pairs_at_or_above']} of {r['different_pairs']} | "
            + " | ".join(f"{r[c + '_pairs_at_or_above']} ({r[c + '_chance']:.1f})" for c in classes)
            + f" | {r['groups']} | {r['largest']} | {r['mixed_class_groups']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
