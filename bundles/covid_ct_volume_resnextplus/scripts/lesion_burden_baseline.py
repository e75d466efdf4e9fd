"""The lesion model's burden as a slice / volume call, for comparison with the detector (issue 21: the burden is a
feature in result.json; it becomes the decision only if it measurably helps).

The shipped A-SegNet lesion bundle segments every slice. A slice is called positive when its lesion area exceeds
a threshold (percent of the slice's lung mask: ``lung_mask_8bit`` for 2D slices, ``lung_mask`` for HU volumes); that
threshold is chosen, like the detector's, at <= 5 % false-positive slices on negatives that are not reported: the
non-COVID 2D slices of ct_slices_cls (the UCSD non-COVID slices are reported). A-SegNet was trained on the 50 MedSeg
slices only, so P001 and normal001 are held out for it.

    python bundles/covid_ct_volume_resnextplus/scripts/lesion_burden_baseline.py --data ../shared/data \
        --out /tmp/21/lesion
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))


def main() -> None:
    from data_prep import datalists as dl
    from data_prep.io import read_volume
    from data_prep.lung import lung_mask
    from monai_covid.batch import BUNDLES, bundles_dir
    from monai_covid.inference.lesion import load_bundle_network, segment_slices, segment_volume
    from monai_covid.volume_detector import binary_metrics, lung_mask_8bit
    from monai_covid.volume_mil import _read_gray, block_bootstrap_f1, threshold_at_fpr, wilson_ci

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    net = load_bundle_network(bundles_dir() / BUNDLES["asegnet"][0], "cpu")
    t0 = time.time()

    def burden_2d(paths: list[str]) -> np.ndarray:
        grays = [_read_gray(p) for p in paths]
        masks = segment_slices(net, [g / 255.0 for g in grays], device="cpu", amp=False)
        lungs = [lung_mask_8bit(g) for g in grays]
        return np.array(
            [100.0 * float((m.astype(bool) & lu).sum()) / max(int(lu.sum()), 1) for m, lu in zip(masks, lungs)],
            dtype=np.float32,
        )

    cls = dl.ct_slices_cls_datalist(args.data)
    cls_neg = burden_2d([d["image"] for d in cls if d["label"] == 0])
    thr = threshold_at_fpr(cls_neg, 0.05)
    ucsd = dl.ct_slices_ucsd_datalist(args.data)
    ucsd_neg = burden_2d([d["image"] for d in ucsd if d["label"] == 0])
    ucsd_pos = burden_2d([d["image"] for d in ucsd if d["label"] == 1])
    res: dict = {
        "threshold_percent_of_lung": thr,
        "selected_on": f"ct_slices_cls non_covid (n={len(cls_neg)}), <= 5 % FP",
        "ucsd_non_covid_positive": [int((ucsd_neg >= thr).sum()), len(ucsd_neg)],
        "ucsd_covid_positive": [int((ucsd_pos >= thr).sum()), len(ucsd_pos)],
        "series": {},
    }
    for d in dl.ct_dicom_datalist(args.data):
        vol = read_volume(d["image"])
        lung = lung_mask(vol.array, vol.spacing)
        t1 = time.time()
        les = segment_volume(net, vol.array, lung, device="cpu", amp=False).astype(bool) & lung
        n = vol.n_slices
        lung_px = np.maximum(lung.reshape(n, -1).sum(1), 1)
        pct = 100.0 * les.reshape(n, -1).sum(1) / lung_px
        truth = np.array([int(d["slice_labels"].get(i, 0)) for i in vol.instance_numbers])
        calls = (pct >= thr).astype(int)
        m = binary_metrics(truth, calls)
        res["series"][d["series_id"]] = {
            "lesion_percent_of_lung": float(100.0 * les.sum() / max(lung.sum(), 1)),
            "positive_slices": [int(calls.sum()), n],
            "positive_ci95": wilson_ci(int(calls.sum()), n),
            "slice_f1": m["F1"],
            "slice_f1_ci95": block_bootstrap_f1(truth, calls) if d["label"] else None,
            "seconds": round(time.time() - t1, 1),
            "slice_percent": [round(float(v), 3) for v in pct],
        }
        print(
            d["series_id"], {k: v for k, v in res["series"][d["series_id"]].items() if k != "slice_percent"}, flush=True
        )
    res["seconds_total"] = round(time.time() - t0, 1)
    (out / "lesion_burden.json").write_text(json.dumps(res, indent=1))
    print({k: v for k, v in res.items() if k != "series"})


if __name__ == "__main__":
    main()
