"""The second, weaker check of issue 18 for models trained on the doctor slices only: Dice against the pseudo-labels
of the held-out pseudo-label patients (``ct_lesion_pseudo``, ``part="val"``: patients no training or CV run of this
bundle has used), slices re-windowed per volume onto the doctor slices' grey scale, each model at its own lesion
threshold, through the inference path (``monai_covid.semi_supervised.score_pseudo_holdout``). Nothing is chosen on
it: it is reported next to the doctor-slice CV.

Each ``--model LABEL PATH THRESHOLD``: ``PATH`` is a bundle folder (its ``network_def`` from ``inference.json``)
followed by ``:`` and an fp16/fp32 state_dict file, e.g. ``bundles/covid_ct_lesion_asegnet:/tmp/model_040.pt``;
``--cv LABEL WORK_DIR/VARIANT THRESHOLD`` averages the five fold models of a ``monai_covid.crossval`` work dir (last
epoch), slice by slice::

    python bundles/covid_ct_lesion_asegnet/scripts/pseudo_holdout_models.py \\
        --model "0.5.0" bundles/covid_ct_lesion_asegnet:bundles/covid_ct_lesion_asegnet/models/model.pt 0.8 \\
        --cv "A-SegNet 120 ep folds" /tmp/18/aseg_long/asegnet 0.8 --out bundles/covid_ct_lesion_asegnet/docs/x.md

Writes a markdown table: Dice per patient, the mean over patients with a 95 % t-interval over the patients, the
mean over all slices, specificity, and the command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[3]


def _bundle_net(spec: str):
    from monai.bundle import ConfigParser

    bundle, weights = spec.split(":", 1)
    parser = ConfigParser()
    parser.read_config(str(Path(bundle) / "configs" / "inference.json"))
    net = parser.get_parsed_content("network_def", instantiate=True)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net.eval()


def _fold_nets(variant_dir: Path):
    from monai_covid.crossval import load_run

    nets = []
    for fold_dir in sorted(variant_dir.glob("fold[0-9]")):
        ov = json.loads((fold_dir / "overrides.json").read_text())
        nets.append(load_run(Path(ov["bundle_root"]), fold_dir, ov, "final"))
    if not nets:
        raise SystemExit(f"no fold runs in {variant_dir}")
    return nets


def main(argv: list[str] | None = None) -> int:
    from scipy import stats

    from monai_covid.semi_supervised import score_pseudo_holdout

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs=3, action="append", default=[], metavar=("LABEL", "BUNDLE:WEIGHTS", "THRESHOLD"))
    p.add_argument("--cv", nargs=3, action="append", default=[], metavar=("LABEL", "VARIANT_DIR", "THRESHOLD"))
    p.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)

    results: dict[str, list[dict]] = {}
    for label, spec, thr in a.model:
        results[label] = score_pseudo_holdout(_bundle_net(spec), a.data_dir, threshold=float(thr), rewindow=True)
    for label, vdir, thr in a.cv:
        per_model = [
            score_pseudo_holdout(n, a.data_dir, threshold=float(thr), rewindow=True) for n in _fold_nets(Path(vdir))
        ]
        rows = []
        for slices in zip(*per_model):  # the same slices in the same order for every fold model
            rows.append(
                {
                    **{k: slices[0][k] for k in ("volume", "patient", "image")},
                    "dice": float(np.mean([s["dice"] for s in slices])),
                    "specificity": float(np.mean([s["specificity"] for s in slices])),
                }
            )
        results[label] = rows
    patients = sorted({r["patient"] for rows in results.values() for r in rows})
    lines = [
        "| model (threshold) | "
        + " | ".join(f"{pt} Dice" for pt in patients)
        + " | mean over patients (95 % CI) | all slices: Dice | specificity |",
        "|---|" + "---|" * (len(patients) + 3),
    ]
    thresholds = {lab: thr for lab, _, thr in a.model + a.cv}
    for label, rows in results.items():
        per_p = [float(np.mean([r["dice"] for r in rows if r["patient"] == pt])) for pt in patients]
        m, se = float(np.mean(per_p)), float(np.std(per_p, ddof=1) / np.sqrt(len(per_p)))
        h = float(stats.t.ppf(0.975, len(per_p) - 1)) * se
        lines.append(
            f"| {label} ({thresholds[label]}) | "
            + " | ".join(f"{x:.3f}" for x in per_p)
            + f" | {m:.3f} ({max(0.0, m - h):.3f}–{min(1.0, m + h):.3f}) | {np.mean([r['dice'] for r in rows]):.3f} | "
            + f"{np.nanmean([r['specificity'] for r in rows]):.3f} |"
        )
    n = len(next(iter(results.values())))
    lines += [
        "",
        f"{n} pseudo-labelled slices of the {len(patients)} held-out patients, re-windowed per volume; Dice against "
        "the pseudo-label thresholded at 128 of 255 (a model's labels, not a radiologist's); CPU, 1 thread.",
        "",
        "Command: `python "
        + " ".join([str(Path(sys.argv[0]))] + [f'"{x}"' if " " in x else x for x in (argv or sys.argv[1:])])
        + "`",
        "",
    ]
    from monai_covid.io_utils import atomic_write_text

    atomic_write_text(a.out, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
