"""Score the CV checkpoints of ``monai_covid.crossval`` under inference options: a probability threshold other
than 0.5, or a probability-averaging ensemble of several runs of the same fold.

Each ``--member`` is a variant folder of a crossval work dir (``<work_dir>/<variant>``, holding ``fold<k>/model.pt``
and ``fold<k>/overrides.json``); the bundle of each member is read from its overrides, so members may come from
either CT lesion bundle. Every fold is scored on its own held-out slices at their original size through
``segment_slices`` (as ``crossval`` does), so an ensemble's figure is out-of-fold like a single model's::

    python bundles/covid_ct_lesion_asegnet/scripts/cv_inference_options.py --folds 0 1 \\
        --member /tmp/aseg_rep4/asegnet --member /tmp/aseg_c256/asegnet --thresholds 0.5

One line per (members, threshold): mean over folds of the per-image Dice, specificity and sensitivity, and the
per-fold Dice.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from monai_covid.crossval import load_run, score_network


class ProbabilityAverage(torch.nn.Module):
    """Log of the mean softmax of ``nets`` (so the softmax that ``segment_slices`` applies gives the mean)."""

    def __init__(self, nets: list[torch.nn.Module]) -> None:
        super().__init__()
        self.nets = torch.nn.ModuleList(nets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prob = torch.stack([torch.softmax(n(x).float(), dim=1) for n in self.nets]).mean(0)
        return torch.log(prob.clamp_min(1e-8))


def load_member(member: Path, fold: int) -> torch.nn.Module:
    """The fold's checkpoint of one crossval variant folder (its bundle read from the run's overrides)."""
    run = member / f"fold{fold}"
    overrides = json.loads((run / "overrides.json").read_text())
    return load_run(Path(overrides["bundle_root"]), run, overrides)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--member", action="append", type=Path, required=True, help="<work_dir>/<variant>; repeat")
    p.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--n_folds", type=int, default=5)
    p.add_argument("--thresholds", nargs="+", type=float, default=[0.5])
    p.add_argument("--data_dir", default=str(Path(__file__).resolve().parents[4] / "shared" / "data"))
    a = p.parse_args()
    torch.set_num_threads(1)
    keys = ("dice", "specificity", "sensitivity")
    scores = {t: [] for t in a.thresholds}  # threshold -> per fold [mean dice, specificity, sensitivity]
    for f in a.folds:
        nets = [load_member(m, f) for m in a.member]
        net = nets[0] if len(nets) == 1 else ProbabilityAverage(nets)
        for t in a.thresholds:
            rows = score_network(net, a.data_dir, f, a.n_folds, threshold=t)
            scores[t].append([np.nanmean([r[k] for r in rows]) for k in keys])
    names = " + ".join(f"{m.parent.name}/{m.name}" for m in a.member)
    for t, v in scores.items():
        v = np.asarray(v)
        print(
            f"{names} | threshold {t:.2f} | Dice {v[:, 0].mean():.3f} | specificity {v[:, 1].mean():.3f} | "
            f"sensitivity {v[:, 2].mean():.3f} | folds {' '.join(f'{x:.3f}' for x in v[:, 0])}"
        )


if __name__ == "__main__":
    main()
