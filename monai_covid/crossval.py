"""k-fold cross-validation of a segmentation bundle's ``train.json``, and training of the shipped model.

One command trains every (model variant, fold) through ``monai.bundle.ConfigWorkflow`` (each run in its own
process, one thread each), then scores each fold's best checkpoint on that fold's held-out slices *at their
original size* through :func:`monai_covid.inference.lesion.segment_slices` (the same path as the bundle's
inference), with per-image Dice, sensitivity and specificity. It writes ``cv_per_image.csv``, ``cv_folds.csv``
and ``cv_results.md`` (per fold and mean +- sd over folds) into ``--docs_dir``::

    python -m monai_covid.crossval bundles/covid_ct_lesion_asegnet --variants asegnet segnet attention_unet \\
        --jobs 2 --work_dir /tmp/asegnet_cv

``--final`` then trains the shipped model on all slices for the median best epoch of the CV (or ``--final_epochs``)
and saves it as an fp16 state_dict to ``models/model.pt``. The variants of each CT lesion bundle are defined here
(``VARIANTS``)::

    python -m monai_covid.crossval bundles/covid_ct_lesion_cosup_resunet \\
        --variants cosup resunet cosup_no_edge cosup_no_aux cosup_no_fusion --jobs 2 --work_dir /tmp/cosup_cv

Semi-supervised (``monai_covid.semi_supervised``): ``--pretrain_epochs N`` first pre-trains each variant once on
the pseudo-labelled slices (``stage=pretrain``, overrides in ``--pretrain_set``), scores it against the pseudo-labels
of the held-out patients (``pseudo_holdout.csv`` / ``.md``), then fine-tunes every fold (and ``--final``) from those
weights; ``--checkpoint final`` scores the last epoch's weights (a fixed epoch count) instead of the best epoch on
the validation fold. ``--resume`` continues interrupted runs from their last epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_covid.io_utils import save_fp16

__all__ = [
    "VARIANTS",
    "bundle_variants",
    "train_one",
    "load_run",
    "fold_probabilities",
    "score_network",
    "THRESHOLD_GRID",
    "mean_dice_by_threshold",
    "crossfit_thresholds",
    "score_fold",
    "per_image_scores",
    "summarise",
    "main",
]

#: per bundle (folder name): the variants compared in its CV table, as config overrides on top of its train.json;
#: the first variant is the bundle's shipped model (its CV best epochs set the ``--final`` epoch count)
_STOCK_UNET: dict[str, Any] = {  # the stock MONAI UNet as its tutorials build it (the floor row of both lesion bundles)
    "network_def": {
        "_target_": "UNet",
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": 2,
        "channels": [16, 32, 64, 128, 256],
        "strides": [2, 2, 2, 2],
        "num_res_units": 2,
    }
}
_STOCK_BASIC_UNET: dict[str, Any] = {  # MONAI BasicUNet with its default features (the issue's second floor row)
    "network_def": {"_target_": "BasicUNet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2}
}
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "covid_ct_lesion_asegnet": {
        "asegnet": {},
        "segnet": {"network_def#attention": False},
        "asegnet_wide": {"network_def#channels": [16, 32, 64, 128, 256]},
        "asegnet_instnorm": {"network_def#norm": "instance"},  # the shipped default since 0.4.0
        "asegnet_batchnorm": {"network_def#norm": "batch", "negatives": False},  # the 0.3.0 recipe
        "unet": _STOCK_UNET,
        "basic_unet": _STOCK_BASIC_UNET,
        "attention_unet": {
            "network_def": {
                "_target_": "AttentionUnet",
                "spatial_dims": 2,
                "in_channels": 1,
                "out_channels": 2,
                "channels": [8, 16, 32, 64, 128],
                "strides": [2, 2, 2, 2],
            }
        },
    },
    "covid_ct_lesion_cosup_resunet": {
        "cosup": {},
        "resunet": {"network_def#edge": False, "network_def#aux": False, "network_def#fusion": False},
        "cosup_no_edge": {"network_def#edge": False},
        "cosup_no_aux": {"network_def#aux": False},
        "cosup_no_fusion": {"network_def#fusion": False},
        "cosup_instnorm": {"network_def#norm": "instance"},
        "cosup_wide": {"network_def#channels": [16, 32, 64, 128, 256]},  # the stock UNet's width
        "unet": _STOCK_UNET,  # trained with this bundle's train.json (CoSupervisionLoss: segmentation term only)
        "basic_unet": _STOCK_BASIC_UNET,
    },
}
#: variants whose checkpoints are also scored with flip test-time augmentation, as an extra row
TTA_ROWS = {"asegnet": "asegnet_tta"}
LABELS = {
    "asegnet": "A-SegNet + focal Tversky",
    "segnet": "SegNet + focal Tversky",
    "asegnet_wide": "A-SegNet 2x width (16-256) + focal Tversky",
    "asegnet_instnorm": "A-SegNet, instance norm instead of batch norm + focal Tversky",
    "asegnet_batchnorm": "A-SegNet, batch norm, no negatives (0.3.0 recipe) + focal Tversky",
    "attention_unet": "MONAI AttentionUnet + focal Tversky",
    "unet": "MONAI UNet (16-256, 2 res units), the bundle's loss",  # the floor row of both lesion bundles
    "basic_unet": "MONAI BasicUNet (default features), the bundle's loss",
    "asegnet_tta": "A-SegNet + focal Tversky, flip TTA",
    "cosup": "Co-supervision ResUnet (ESM + ASSM + AFM)",
    "resunet": "ResUnet baseline",
    "cosup_instnorm": "Co-supervision ResUnet, instance norm instead of batch norm",
    "cosup_wide": "Co-supervision ResUnet, 2x width (16-256, the stock UNet's)",
    "cosup_no_edge": "without ESM (edge)",
    "cosup_no_aux": "without ASSM (auxiliary)",
    "cosup_no_fusion": "without AFM (attention fusion)",
}
LABELS.update({f"{k}_thr": f"{label}, cross-fitted threshold" for k, label in list(LABELS.items())})


def bundle_variants(bundle: Path) -> dict[str, dict[str, Any]]:
    """The CV variants of ``bundle`` (by its folder name), shipped model first."""
    name = Path(bundle).resolve().name
    if name not in VARIANTS:
        raise SystemExit(f"no CV variants defined for bundle {name!r}; known: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def per_image_scores(pred: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """Dice, sensitivity and specificity of one binary mask pair (sensitivity NaN without lesion)."""
    p, g = np.asarray(pred) > 0, np.asarray(label) > 0
    tp = float(np.count_nonzero(p & g))
    fp = float(np.count_nonzero(p & ~g))
    fn = float(np.count_nonzero(~p & g))
    tn = float(p.size) - tp - fp - fn
    dice = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) > 0 else 1.0
    sens = tp / (tp + fn) if (tp + fn) > 0 else float("nan")
    spec = tn / (tn + fp) if (tn + fp) > 0 else float("nan")
    return {"dice": dice, "sensitivity": sens, "specificity": spec}


def _run_overrides(bundle: Path, run_dir: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """The overrides a run of ``bundle`` in ``run_dir`` is trained with (written to ``run_dir/overrides.json``)."""
    return {"bundle_root": str(bundle), "ckpt_dir": str(run_dir), "output_dir": str(run_dir), **overrides}


def check_same_run(bundle: Path, run_dir: Path, overrides: dict[str, Any]) -> None:
    """Refuse to reuse or resume ``run_dir`` when it holds a run of other settings (another bundle's recipe, another
    loss, ...): a work dir shared between two CV commands would otherwise score the wrong run under this name."""
    stored = run_dir / "overrides.json"
    if not stored.is_file():
        return
    old = {k: v for k, v in json.loads(stored.read_text()).items() if k != "resume"}
    new = {k: v for k, v in json.loads(json.dumps(_run_overrides(bundle, run_dir, overrides))).items() if k != "resume"}
    if old != new:
        keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise SystemExit(
            f"[cv] {run_dir} holds a run with other settings (differs in: {', '.join(keys)}); "
            "use another --work_dir or remove that folder"
        )


def train_one(bundle: Path, run_dir: Path, overrides: dict[str, Any], log_path: Path) -> subprocess.Popen:
    """Start one training run of ``configs/train.json`` (one thread) in the background; returns the process."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ov = _run_overrides(bundle, run_dir, overrides)
    (run_dir / "overrides.json").write_text(json.dumps(ov, indent=1))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "monai_covid.crossval", "_train", str(bundle), str(run_dir / "overrides.json")]
    mode = "a" if overrides.get("resume") else "w"  # a resumed run keeps the log of its earlier epochs
    proc = subprocess.Popen(cmd, stdout=open(log_path, mode), stderr=subprocess.STDOUT, env=env)
    (run_dir / "running.pid").write_text(str(proc.pid))
    return proc


def _running_elsewhere(run_dir: Path) -> bool:
    """True while another coordinator's training process for ``run_dir`` is alive (so both can share a work dir)."""
    try:
        os.kill(int((run_dir / "running.pid").read_text()), 0)
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return False
    return True


def _train_worker(bundle: str, overrides_file: str) -> int:
    """Run train.json with the overrides in ``overrides_file``; record the best epoch and the wall time."""
    import torch

    from monai.bundle import ConfigWorkflow

    torch.set_num_threads(1)
    ov = json.loads(Path(overrides_file).read_text())
    run_dir = Path(ov["ckpt_dir"])
    wf = ConfigWorkflow(config_file=str(Path(bundle) / "configs" / "train.json"), workflow_type="train", **ov)
    wf.initialize()
    from ignite.engine import Events

    trainer = wf.parser.get_parsed_content("train#trainer")
    first: list[int] = []  # first epoch run by this process (a resumed run starts after its checkpoint)
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: first or first.append(e.state.epoch))
    t0, c0 = time.time(), time.process_time()
    wf.run()
    seconds, cpu_seconds = time.time() - t0, time.process_time() - c0
    evaluator = wf.parser.get_parsed_content("validate#evaluator")
    n_here = max(1, trainer.state.epoch - (first[0] if first else 1) + 1)
    info = {
        "best_metric": float(evaluator.state.best_metric),
        "best_epoch": int(evaluator.state.best_metric_epoch),
        "epochs_run": int(trainer.state.epoch),
        "train_seconds": seconds,
        "seconds_per_epoch": seconds / n_here,
        "cpu_seconds_per_epoch": cpu_seconds / n_here,  # wall time depends on machine load
        "epochs_run_by_last_process": n_here,
    }
    (run_dir / "train_info.json").write_text(json.dumps(info, indent=1))
    wf.finalize()
    return 0


_CKPT_FILES = {"best": "model.pt", "final": "model_final.pt"}


def _network_from_overrides(bundle: Path, overrides: dict[str, Any]):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser.update({k: v for k, v in overrides.items() if k.startswith("network_def")})
    return parser.get_parsed_content("network_def", instantiate=True)


def load_run(bundle: Path, run_dir: Path, overrides: dict[str, Any], checkpoint: str = "best"):
    """The network of one training run (its ``network_def`` overrides), in eval mode: ``checkpoint="best"`` loads
    ``run_dir/model.pt`` (best validation epoch), ``"final"`` ``run_dir/model_final.pt`` (last epoch)."""
    import torch

    net = _network_from_overrides(bundle, overrides)
    net.load_state_dict(torch.load(run_dir / _CKPT_FILES[checkpoint], map_location="cpu", weights_only=True))
    return net.eval()


def fold_probabilities(
    net, data_dir: str, fold: int, n_folds: int, tta: bool = False
) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """Names, lesion probability maps (at original size, through the inference path ``slice_probabilities``) and
    boolean doctor masks of the fold's held-out slices."""
    from PIL import Image

    from data_prep.datalists import make_datalist
    from monai_covid.inference.lesion import slice_probabilities

    items = make_datalist("ct_lesion_slices", data_dir, fold=fold, n_folds=n_folds, part="val")
    images = [np.asarray(Image.open(i["image"]).convert("L"), dtype=np.float32) / 255.0 for i in items]
    labels = [np.asarray(Image.open(i["label"]).convert("L")) > 127 for i in items]
    return [Path(i["image"]).name for i in items], slice_probabilities(net, images, tta=tta), labels


def score_network(
    net, data_dir: str, fold: int, n_folds: int, tta: bool = False, threshold: float = 0.5
) -> list[dict[str, Any]]:
    """Per-image scores of ``net`` on the fold's held-out slices at their original size, through the inference
    path (``tta``: left-right flip test-time augmentation; ``threshold`` on the lesion probability)."""
    names, probs, labels = fold_probabilities(net, data_dir, fold, n_folds, tta=tta)
    return [{"fold": fold, "image": n, **per_image_scores(p > threshold, g)} for n, p, g in zip(names, probs, labels)]


#: thresholds on the lesion probability tried by the cross-fitting (``crossfit_thresholds``)
THRESHOLD_GRID = tuple(round(0.30 + 0.05 * i, 2) for i in range(11))


def mean_dice_by_threshold(
    probs: Sequence[np.ndarray], labels: Sequence[np.ndarray], grid: Sequence[float] = THRESHOLD_GRID
) -> np.ndarray:
    """Mean per-image Dice of ``probs > t`` against ``labels`` for every ``t`` of ``grid``."""
    return np.array([np.mean([per_image_scores(p > t, g)["dice"] for p, g in zip(probs, labels)]) for t in grid])


def _best_threshold(dice: np.ndarray, grid: Sequence[float]) -> float:
    """The grid value of the highest mean Dice; among equal values (to 1e-9) the one nearest 0.5."""
    top = np.flatnonzero(dice >= dice.max() - 1e-9)
    return float(min((grid[i] for i in top), key=lambda t: (abs(t - 0.5), t)))


def crossfit_thresholds(
    folds: dict[int, tuple[Sequence[np.ndarray], Sequence[np.ndarray]]], grid: Sequence[float] = THRESHOLD_GRID
) -> tuple[dict[int, float], float, dict[int, np.ndarray]]:
    """Cross-fitted lesion thresholds. ``folds``: per fold, the out-of-fold probability maps and masks of its
    held-out slices (each fold predicted by its own fold model). For fold k, ``t_k`` maximises the mean per-image
    Dice over the slices of all *other* folds (so no label of fold k chooses it); the overall threshold maximises it
    over every slice (the one a model trained on all slices would ship). Returns ``({k: t_k}, overall,
    {k: mean Dice of fold k at every grid value})``."""
    curves = {k: mean_dice_by_threshold(p, g, grid) for k, (p, g) in folds.items()}
    sizes = {k: len(p) for k, (p, _) in folds.items()}
    per_fold = {}
    for k in folds:
        others = [j for j in folds if j != k]
        if not others:
            raise ValueError("crossfit_thresholds needs at least two folds")
        pooled = sum(curves[j] * sizes[j] for j in others) / sum(sizes[j] for j in others)
        per_fold[k] = _best_threshold(pooled, grid)
    overall = sum(curves[j] * sizes[j] for j in folds) / sum(sizes.values())
    return per_fold, _best_threshold(overall, grid), curves


def score_fold(
    bundle: Path,
    run_dir: Path,
    overrides: dict[str, Any],
    data_dir: str,
    fold: int,
    n_folds: int,
    tta: bool = False,
    checkpoint: str = "best",
):
    """Per-image scores of the fold's held-out slices at original size, with the run's best (or ``"final"``)
    checkpoint (``tta``: with left-right flip test-time augmentation)."""
    return score_network(load_run(bundle, run_dir, overrides, checkpoint), data_dir, fold, n_folds, tta=tta)


def _mean_sd(values: Sequence[float]) -> str:
    v = [x for x in values if not np.isnan(x)]
    if not v:
        return "n/a"
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.mean(v):.3f} ± {sd:.3f}"


def _ci95(values: Sequence[float], bounds: tuple[float, float] | None = None) -> str:
    """95 % confidence interval of the mean of ``values`` (Student t over the fold means); ``bounds``: the range of
    the metric (e.g. ``(0, 1)`` for a proportion), to which the interval is clipped."""
    from scipy import stats

    v = [x for x in values if not np.isnan(x)]
    if len(v) < 2:
        return "n/a"
    m, se = statistics.mean(v), statistics.stdev(v) / np.sqrt(len(v))
    h = float(stats.t.ppf(0.975, len(v) - 1)) * se
    lo, hi = m - h, m + h
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return f"{lo:.3f}–{hi:.3f}"


def summarise(per_image: list[dict[str, Any]], infos: dict[tuple[str, int], dict], command: str) -> tuple[list, str]:
    """Per-fold rows (means over the fold's images) and a markdown table with mean ± sd over folds."""
    folds_rows = []
    variants = sorted({r["variant"] for r in per_image}, key=lambda v: list(LABELS).index(v))
    for v in variants:
        for f in sorted({r["fold"] for r in per_image if r["variant"] == v}):
            rs = [r for r in per_image if r["variant"] == v and r["fold"] == f]
            info = infos.get((v, f), {})
            folds_rows.append(
                {
                    "variant": v,
                    "fold": f,
                    "n_images": len(rs),
                    "dice": float(np.mean([r["dice"] for r in rs])),
                    "sensitivity": float(np.nanmean([r["sensitivity"] for r in rs])),
                    "specificity": float(np.nanmean([r["specificity"] for r in rs])),
                    "best_epoch": info.get("best_epoch", ""),
                    "epochs_run": info.get("epochs_run", ""),
                    "seconds_per_epoch": round(info["seconds_per_epoch"], 1) if "seconds_per_epoch" in info else "",
                    "cpu_seconds_per_epoch": (
                        round(info["cpu_seconds_per_epoch"], 1) if "cpu_seconds_per_epoch" in info else ""
                    ),
                }
            )
    lines = [
        "| model | fold | images | Dice | sensitivity | specificity | best epoch / run | wall s/epoch | CPU s/epoch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in folds_rows:
        lines.append(
            f"| {LABELS.get(r['variant'], r['variant'])} | {r['fold']} | {r['n_images']} | {r['dice']:.3f} | "
            f"{r['sensitivity']:.3f} | {r['specificity']:.3f} | {r['best_epoch']} / {r['epochs_run']} | "
            f"{r['seconds_per_epoch']} | {r['cpu_seconds_per_epoch']} |"
        )
    lines += [
        "",
        "Mean ± sd over folds (each fold: mean over its images):",
        "",
        "| model | Dice | sensitivity | specificity | Dice 95 % CI | specificity 95 % CI |",
        "|---|---|---|---|---|---|",
    ]
    for v in variants:
        fr = [r for r in folds_rows if r["variant"] == v]
        lines.append(
            f"| {LABELS.get(v, v)} | {_mean_sd([r['dice'] for r in fr])} | "
            f"{_mean_sd([r['sensitivity'] for r in fr])} | {_mean_sd([r['specificity'] for r in fr])} | "
            f"{_ci95([r['dice'] for r in fr], (0.0, 1.0))} | {_ci95([r['specificity'] for r in fr], (0.0, 1.0))} |"
        )
    lines += ["", "95 % CI: Student t over the fold means (5 folds: mean ± 2.78 sd / √5)."]
    lines += ["", f"Command: `{command}`", ""]
    return folds_rows, "\n".join(lines)


def _run_all(jobs: list[tuple[Any, Path, dict, Path]], bundle: Path, max_jobs: int) -> None:
    pending = list(jobs)
    running: list[tuple[Any, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < max_jobs:
            key, run_dir, ov, log = pending.pop(0)
            check_same_run(bundle, run_dir, ov)
            if (run_dir / "train_info.json").is_file():
                print(f"[cv] {key}: already trained, reusing {run_dir}", flush=True)
                continue
            if _running_elsewhere(run_dir):
                print(f"[cv] {key}: being trained by another process, skipped here", flush=True)
                continue
            print(f"[cv] start {key} -> {run_dir}", flush=True)
            running.append((key, train_one(bundle, run_dir, ov, log)))
        time.sleep(5)
        for key, proc in list(running):
            if proc.poll() is not None:
                running.remove((key, proc))
                status = "done" if proc.returncode == 0 else f"FAILED (rc {proc.returncode}, see log)"
                print(f"[cv] {key}: {status}", flush=True)


def _pseudo_holdout_rows(bundle: Path, run_dir: Path, ov: dict[str, Any], data_dir: str, variant: str) -> list[dict]:
    from monai_covid.semi_supervised import score_pseudo_holdout

    net = load_run(bundle, run_dir, ov, "final")
    rewindow = bool(ov.get("pseudo_rewindow", False))  # scored on the grey scale it was pre-trained on
    return [{"variant": variant, **r} for r in score_pseudo_holdout(net, data_dir, rewindow=rewindow)]


def _write_pseudo_holdout(rows: list[dict[str, Any]], docs: Path, argv: Sequence[str]) -> None:
    """Per-slice CSV and a per-variant, per-patient markdown table of the pre-trained models on held-out patients."""
    from monai_covid.io_utils import atomic_write_csv, atomic_write_text

    if not rows:
        return
    atomic_write_csv(docs / "pseudo_holdout.csv", rows, list(rows[0]))
    patients = sorted({r["patient"] for r in rows})
    lines = [
        "| model | " + " | ".join(f"{p} Dice" for p in patients) + " | all slices: Dice | soft Dice | specificity |",
        "|---|" + "---|" * (len(patients) + 3),
    ]
    for v in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == v]
        per_p = [np.mean([r["dice"] for r in rs if r["patient"] == p]) for p in patients]
        lines.append(
            f"| {LABELS.get(v, v)} | "
            + " | ".join(f"{x:.3f}" for x in per_p)
            + f" | {np.mean([r['dice'] for r in rs]):.3f} | {np.mean([r['soft_dice'] for r in rs]):.3f} | "
            + f"{np.nanmean([r['specificity'] for r in rs]):.3f} |"
        )
    n = len({r["image"] for r in rows})
    lines += [
        "",
        f"{n} slices of {len(patients)} held-out patients, pseudo-labels thresholded at 128 (soft Dice: "
        "against the probability map); the pre-trained weights before any fine-tuning.",
        "",
        "Command: `python -m monai_covid.crossval " + " ".join(str(x) for x in argv) + "`",
        "",
    ]
    atomic_write_text(docs / "pseudo_holdout.md", "\n".join(lines))


def _write_learning_curves(
    work_dir: Path, variants: Sequence[str], folds: Sequence[int], docs: Path, pretrained: bool = False
) -> None:
    """learning_curves.png from the runs' logs: validation Dice by epoch on each fold's held-out doctor slices (thin:
    each fold, thick: their mean) and, with ``pretrained``, a first panel for the pre-training (held-out patients'
    pseudo-labels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from monai_covid.io_utils import atomic_save_figure
    from monai_covid.semi_supervised import read_epoch_metrics

    def val(log: Path) -> list[dict]:
        return [r for r in read_epoch_metrics(log) if "val_mean_dice" in r] if log.is_file() else []

    fig, axes = plt.subplots(1, 2 if pretrained else 1, figsize=(9 if pretrained else 5.4, 3.6), dpi=90, squeeze=False)
    axes = axes[0]
    for i, v in enumerate(variants):
        c = f"C{i}"
        if pretrained:
            pre = val(work_dir / f"{v}_pretrain.log")
            axes[0].plot(
                [r["epoch"] for r in pre], [r["val_mean_dice"] for r in pre], "o-", color=c, label=LABELS.get(v, v)
            )
        curves = [val(work_dir / f"{v}_fold{f}.log") for f in folds]
        for k, rows in enumerate(curves):
            axes[-1].plot(
                [r["epoch"] for r in rows],
                [r["val_mean_dice"] for r in rows],
                color=c,
                lw=0.7,
                alpha=0.5,
                label=LABELS.get(v, v) + " (each fold; thick: mean)" if k == 0 else None,
            )
        n = min((len(r) for r in curves if r), default=0)
        if n:
            mean = [np.mean([rows[e]["val_mean_dice"] for rows in curves if len(rows) >= n]) for e in range(n)]
            axes[-1].plot(range(1, n + 1), mean, color=c, lw=2.2)
    if pretrained:
        axes[0].set_title("pre-training: Dice vs pseudo-labels of 4 held-out patients", fontsize=8)
    stage = "fine-tuning" if pretrained else "training"
    axes[-1].set_title(f"{stage}: Dice on the fold's 10 held-out doctor slices", fontsize=8)
    for ax in axes:
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("validation Dice (256 px)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    atomic_save_figure(fig, docs / "learning_curves.png")


def _crossfit_rows(oof: dict[str, dict[int, tuple]], docs: Path, command: str) -> list[dict[str, Any]]:
    """Per-image rows of every variant at its cross-fitted thresholds (variant ``<v>_thr``); writes
    ``threshold_crossfit.md`` / ``.csv`` (per-fold thresholds, the overall one, mean Dice against the threshold)."""
    from monai_covid.io_utils import atomic_write_csv, atomic_write_text

    rows, curve_rows = [], []
    lines = [
        "Lesion threshold cross-fitted over the folds: for fold k, the value of the grid with the highest mean "
        "per-image Dice on the held-out slices of the other folds (each predicted by its own fold model); "
        "'overall' pools all folds (the threshold a model trained on all slices would ship).",
        "",
        "| model | " + " | ".join(f"t fold {k}" for k in sorted(next(iter(oof.values())))) + " | overall |",
        "|---|" + "---|" * (len(next(iter(oof.values()))) + 1),
    ]
    for v, folds in oof.items():
        if len(folds) < 2:
            continue
        per_fold, overall, curves = crossfit_thresholds({k: (p, g) for k, (_, p, g) in folds.items()})
        for k, (names, probs, labels) in sorted(folds.items()):
            rows += [
                {"variant": f"{v}_thr", "fold": k, "image": n, **per_image_scores(p > per_fold[k], g)}
                for n, p, g in zip(names, probs, labels)
            ]
            curve_rows += [
                {"variant": v, "fold": k, "threshold": t, "mean_dice": round(float(d), 5)}
                for t, d in zip(THRESHOLD_GRID, curves[k])
            ]
        lines.append(
            f"| {LABELS.get(v, v)} | " + " | ".join(f"{per_fold[k]:.2f}" for k in sorted(folds)) + f" | {overall:.2f} |"
        )
    lines += ["", f"Grid: {', '.join(f'{t:.2f}' for t in THRESHOLD_GRID)}. Command: `{command}`", ""]
    if curve_rows:
        atomic_write_csv(docs / "threshold_crossfit.csv", curve_rows, list(curve_rows[0]))
        atomic_write_text(docs / "threshold_crossfit.md", "\n".join(lines))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_train":
        return _train_worker(argv[1], argv[2])
    p = argparse.ArgumentParser(prog="python -m monai_covid.crossval", description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--variants", nargs="+", default=None, help="default: the bundle's shipped model (VARIANTS)")
    p.add_argument("--folds", nargs="*", type=int, default=[0, 1, 2, 3, 4], help="none: no CV (with --final)")
    p.add_argument("--n_folds", type=int, default=5)
    p.add_argument("--data_dir", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    p.add_argument("--work_dir", type=Path, default=Path("/tmp/monai_covid_cv"))
    p.add_argument("--docs_dir", type=Path, default=None, help="default: <bundle>/docs")
    p.add_argument("--jobs", type=int, default=2, help="training runs at once (one thread each)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="extra train.json overrides")
    p.add_argument("--final", action="store_true", help="then train on all slices and write models/model.pt (fp16)")
    p.add_argument("--final_epochs", type=int, default=None, help="default: median best epoch of the CV runs")
    p.add_argument("--pretrain_epochs", type=int, default=0, help="> 0: pre-train each variant on the pseudo-labels")
    p.add_argument("--pretrain_set", nargs="*", default=[], metavar="KEY=JSON", help="overrides of the pre-training")
    p.add_argument("--checkpoint", choices=sorted(_CKPT_FILES), default="best", help="checkpoint of a run to score")
    p.add_argument("--resume", action="store_true", help="continue unfinished runs from their last epoch")
    p.add_argument(
        "--crossfit_threshold",
        action="store_true",
        help="also score each variant at a lesion threshold chosen on the other folds (rows '<variant>_thr')",
    )
    a = p.parse_args(argv)

    bundle = a.bundle.resolve()
    variants = bundle_variants(bundle)
    shipped = next(iter(variants))
    unknown = set(a.variants or []) - set(variants)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)} for {bundle.name}; choose from {list(variants)}")
    docs = (a.docs_dir or bundle / "docs").resolve()
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)}
    common = {"dataset_dir": a.data_dir, "n_folds": a.n_folds, "resume": a.resume, **extra}
    a.work_dir.mkdir(parents=True, exist_ok=True)
    from monai_covid.io_utils import atomic_write_csv, atomic_write_text

    pretrained: dict[str, str] = {}
    if a.pretrain_epochs > 0:
        pre = {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.pretrain_set)}
        pre_jobs = []
        for v in a.variants or [shipped]:
            ov = {
                **common,
                **variants[v],
                "stage": "pretrain",
                "fold": None,
                "max_epochs": a.pretrain_epochs,
                "early_stop_patience": a.pretrain_epochs,
                **pre,
            }
            pre_jobs.append(((v, "pretrain"), a.work_dir / v / "pretrain", ov, a.work_dir / f"{v}_pretrain.log"))
        _run_all(pre_jobs, bundle, a.jobs)
        rows = []
        for (v, _), run_dir, ov, _ in pre_jobs:
            if not (run_dir / "model_final.pt").is_file():
                raise SystemExit(f"[cv] {v}: pre-training did not finish ({run_dir}); rerun with --resume")
            pretrained[v] = str(run_dir / "model_final.pt")
            rows += _pseudo_holdout_rows(bundle, run_dir, ov, a.data_dir, v)
        _write_pseudo_holdout(rows, docs, argv)
    common["stage"] = "finetune" if pretrained else common.get("stage", "supervised")
    jobs = []
    for v in a.variants or [shipped]:
        for f in a.folds:
            run_dir = a.work_dir / v / f"fold{f}"
            ov = {**common, **variants[v], "fold": f, **({"pretrain_ckpt": pretrained[v]} if pretrained else {})}
            jobs.append(((v, f), run_dir, ov, a.work_dir / f"{v}_fold{f}.log"))
    _run_all(jobs, bundle, a.jobs)

    per_image, infos = [], {}
    oof: dict[str, dict[int, tuple]] = {}  # variant -> fold -> (names, probability maps, masks), for --crossfit
    for (v, f), run_dir, ov, _ in jobs:
        if not (run_dir / "train_info.json").is_file():
            print(f"[cv] {v} fold {f}: no finished run, left out of the table", flush=True)
            continue
        infos[(v, f)] = json.loads((run_dir / "train_info.json").read_text())
        names, probs, labels = fold_probabilities(load_run(bundle, run_dir, ov, a.checkpoint), a.data_dir, f, a.n_folds)
        per_image += [
            {"variant": v, "fold": f, "image": n, **per_image_scores(p > 0.5, g)}
            for n, p, g in zip(names, probs, labels)
        ]
        if a.crossfit_threshold:
            oof.setdefault(v, {})[f] = (names, probs, labels)
        if v in TTA_ROWS:  # same checkpoints, mirrored test-time augmentation (an inference option)
            rows = score_fold(bundle, run_dir, ov, a.data_dir, f, a.n_folds, tta=True, checkpoint=a.checkpoint)
            per_image += [{"variant": TTA_ROWS[v], **r} for r in rows]
    command = "python -m monai_covid.crossval " + " ".join(str(x) for x in argv)
    if oof:
        per_image += _crossfit_rows(oof, docs, command)
    if per_image:
        folds_rows, md = summarise(per_image, infos, command)
        fields = ["variant", "fold", "image", "dice", "sensitivity", "specificity"]
        atomic_write_csv(docs / "cv_per_image.csv", per_image, fields)
        atomic_write_csv(docs / "cv_folds.csv", folds_rows, list(folds_rows[0]))
        atomic_write_text(docs / "cv_results.md", md)
        print(md, flush=True)
    if per_image:
        _write_learning_curves(a.work_dir, a.variants or [shipped], a.folds, docs, pretrained=bool(pretrained))

    if a.final:
        best = [i["best_epoch"] for (v, _), i in infos.items() if v == shipped]
        epochs = a.final_epochs or (int(round(statistics.median(best))) if best else None)
        if not epochs:
            raise SystemExit(f"--final needs --final_epochs or finished {shipped} CV runs")
        run_dir = a.work_dir / "final"
        ov = {
            **common,
            "fold": None,
            "max_epochs": epochs,
            "val_interval": epochs,
            "early_stop_patience": epochs,
            **({"pretrain_ckpt": pretrained[shipped]} if shipped in pretrained else {}),
        }
        print(f"[cv] final model: all slices, {epochs} epochs", flush=True)
        _run_all([("final", run_dir, ov, a.work_dir / "final.log")], bundle, 1)
        save_fp16(run_dir / "model_final.pt", bundle / "models" / "model.pt")
        info = json.loads((run_dir / "train_info.json").read_text())
        atomic_write_text(docs / "final_training.json", json.dumps({"epochs": epochs, **info}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
