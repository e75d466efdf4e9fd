"""Grouped k-fold cross-validation of a 2D image classifier bundle, scored out of fold and on an external set.

For each fold ``k`` the bundle's ``configs/train.json`` is run through ``monai.bundle.ConfigWorkflow`` with
``val_fold=k`` (and the variant's overrides); the fold model then scores

- its held-out fold (out-of-fold, OOF: every training image scored once, by the model that did not see its group),
- the external set (e.g. UCSD COVID-CT val), which is never used to train, pick or tune anything.

Decisions taken on training data only:

- **calibration** (:func:`fit_platt`): ``p = sigmoid(a * logit + b)``, fitted by logistic regression on OOF logits;
- **threshold** (:func:`best_f1_threshold`): the calibrated probability that maximises F1 on OOF predictions.

For the OOF figure of fold ``k`` both are fitted on the OOF predictions of the *other* folds (nested); for the
external figure on all OOF predictions, applied to the **mean logit of the k fold models** (the ensemble, decided
before looking at the external set). Metrics come with 95 % bootstrap intervals that resample *groups* (near-duplicate
groups, patients) with replacement (:func:`group_bootstrap_ci`).

    python -m monai_covid.classifier_cv bundles/covid_ct_slice_ctnet --variant ctnet --work_dir /tmp/ctnet_cv
    python -m monai_covid.classifier_cv bundles/covid_ct_slice_ctnet --variant densenet121 --work_dir /tmp/ctnet_cv
    python -m monai_covid.classifier_cv bundles/covid_ct_slice_ctnet --report ctnet_paper ctnet densenet121 \\
        --work_dir /tmp/ctnet_cv --docs_dir bundles/covid_ct_slice_ctnet/docs/evaluation

A rerun skips folds whose ``model.pt`` exists (``--resume`` is the default behaviour; ``--restart`` retrains).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "VARIANTS",
    "fit_platt",
    "apply_platt",
    "best_f1_threshold",
    "binary_metrics",
    "group_resamples",
    "group_bootstrap_ci",
    "reliability_bins",
    "train_fold",
    "score_items",
    "run_variant",
    "report",
    "main",
]

#: the input of the rows run before the percentile rescale / histogram equalisation switches existed (the
#: train.json defaults change with the shipped recipe; the rows keep what they were run with)
_RAW_GREY: dict[str, Any] = {"percentile_norm": False, "hist_norm": False, "lung_crop": False}
#: the input of the shipped 0.4.0 recipe: lung-box crop, then histogram equalisation
_LUNG_CROP_INPUT: dict[str, Any] = {"percentile_norm": False, "hist_norm": True, "lung_crop": True}
#: the stock MONAI floor of the later rows: DenseNet121, Adam 1e-3, paper augmentation, 5 epochs (its CPU time per
#: image is 2.4x CT-Net's, which trains 12)
_DENSENET_FLOOR: dict[str, Any] = {
    "epochs": 5,
    "augment_factor": 1,
    "source_augmentation": False,
    "network_def": {"_target_": "DenseNet121", "spatial_dims": 2, "in_channels": 1, "out_channels": 1},
    "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": 0.001},
}
#: per bundle folder: the variants of its grouped-CV table, as overrides of its train.json
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "covid_ct_slice_ctnet": {
        # paper augmentation + source augmentation (crop/zoom, intensity, blur, noise, JPEG) + label smoothing 0.1;
        # 12 epochs of one pass over the training folds (measured worse: not shipped)
        "ctnet": {"epochs": 12, "augment_factor": 1, "source_augmentation": True, **_RAW_GREY},
        # the 0.1.0 augmentation (paper rotations and flips only, no label smoothing) on the same budget and folds:
        # no intensity normalisation (0.2.0 added the percentile rescale, 0.3.0 ships histogram equalisation)
        "ctnet_paper": {"epochs": 12, "augment_factor": 1, "source_augmentation": False, **_RAW_GREY},
        # the stock MONAI floor: DenseNet121 with its usual Adam 1e-3, same data, folds, augmentation and CPU time
        # (it costs 2.4x CT-Net's time per image, so 5 epochs instead of 12)
        "densenet121": {
            "epochs": 5,
            "augment_factor": 1,
            **_RAW_GREY,
            "source_augmentation": True,
            "network_def": {"_target_": "DenseNet121", "spatial_dims": 2, "in_channels": 1, "out_channels": 1},
            "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": 0.001},
        },
        # the floor with the shipped recipe's (paper) augmentation
        "densenet121_paper": {
            "epochs": 5,
            "augment_factor": 1,
            **_RAW_GREY,
            "source_augmentation": False,
            "network_def": {"_target_": "DenseNet121", "spatial_dims": 2, "in_channels": 1, "out_channels": 1},
            "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": 0.001},
        },
        "ctnet_pctnorm": {"epochs": 12, "augment_factor": 1, "percentile_norm": True, "hist_norm": False, "lung_crop": False},
        # per-image histogram equalisation (monai.transforms.HistogramNormalize): on SARS-CoV-2 alone, global grey
        # statistics separate the classes with no pathology in them (image std AUC 0.16, centre mean 0.77; bundle
        # docs), a shortcut that equalising every image's grey-value distribution removes; CT-Net and the floor
        "ctnet_histnorm": {"epochs": 12, "augment_factor": 1, "percentile_norm": False, "hist_norm": True, "lung_crop": False},
        "densenet121_histnorm": {
            "epochs": 5,
            "augment_factor": 1,
            "source_augmentation": False,
            "percentile_norm": False,
            "hist_norm": True,
            "lung_crop": False,
            "network_def": {"_target_": "DenseNet121", "spatial_dims": 2, "in_channels": 1, "out_channels": 1},
            "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": 0.001},
        },
        # crop every image to its lung box before equalising (data_prep.slice_crop): the UCSD figures show the whole
        # body, table and frame where the SARS-CoV-2 screenshots show the lungs only; CT-Net and the floor
        "ctnet_lungcrop": {"epochs": 12, "augment_factor": 1, "percentile_norm": False, "hist_norm": True, "lung_crop": True},
        "densenet121_lungcrop": {**_DENSENET_FLOOR, "percentile_norm": False, "hist_norm": True, "lung_crop": True},
        # a second training source (data_prep.datalists.ct_slices_extra_datalist): 210 COVID-19 slices of MedSeg, the
        # pseudo-labelled volumes and P001, 222 non-COVID slices of P001 and normal001, added to every training fold
        # (never validated on); the shipped 0.4.0 input (lung crop + equalisation), CT-Net and the floor
        "ctnet_extra": {"epochs": 12, "augment_factor": 1, **_LUNG_CROP_INPUT, "extra_source": True},
        "densenet121_extra": {**_DENSENET_FLOOR, **_LUNG_CROP_INPUT, "extra_source": True},
    }
}
LABELS = {
    "ctnet": "CT-Net (width 16), new recipe: + crop/zoom, intensity, blur, noise, JPEG, label smoothing 0.1",
    "ctnet_paper": "CT-Net (width 16), paper rotations + flips (shipped 0.2.0 recipe)",
    "densenet121": "stock monai.networks.nets.DenseNet121, Adam 1e-3, new-recipe augmentation",
    "ctnet_pctnorm": "CT-Net, paper augmentation + percentile (1-99 %) intensity normalisation",
    "densenet121_paper": "stock monai.networks.nets.DenseNet121, Adam 1e-3, paper rotations + flips",
    "ctnet_histnorm": "CT-Net, paper augmentation + per-image histogram equalisation",
    "densenet121_histnorm": "stock monai.networks.nets.DenseNet121, Adam 1e-3, paper augmentation + histogram equalisation",
    "ctnet_lungcrop": "CT-Net, paper augmentation + lung-box crop + histogram equalisation",
    "densenet121_lungcrop": "stock monai.networks.nets.DenseNet121, Adam 1e-3, paper augmentation + lung-box crop + histogram equalisation",
    "ctnet_extra": "CT-Net, lung crop + equalisation, + second training source (MedSeg, pseudo volumes, COVID-CT-MD)",
    "densenet121_extra": "stock monai.networks.nets.DenseNet121, Adam 1e-3, lung crop + equalisation, + second training source",
}


# ----------------------------------------------------------------------------------------- calibration, metrics
def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -50, 50)))


def fit_platt(logits: Sequence[float], labels: Sequence[int], l2: float = 1e-3, iters: int = 100) -> tuple[float, float]:
    """Platt scaling ``(a, b)``: logistic regression of ``labels`` on ``logits`` (Newton steps, tiny L2 on ``a, b``)."""
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    X = np.stack([x, np.ones_like(x)], 1)
    w = np.zeros(2)  # IRLS from zero converges for logistic regression; a start at (1, 0) can overshoot
    for _ in range(iters):
        p = _sigmoid(X @ w)
        grad = X.T @ (p - y) + l2 * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w = w - step
        if np.abs(step).max() < 1e-9:
            break
    return float(w[0]), float(w[1])


def apply_platt(logits: Sequence[float], ab: tuple[float, float]) -> np.ndarray:
    """Calibrated probability ``sigmoid(a * logit + b)``."""
    return _sigmoid(ab[0] * np.asarray(logits, dtype=np.float64) + ab[1])


def binary_metrics(labels: Sequence[int], probs: Sequence[float], threshold: float, auc: bool = True) -> dict[str, float]:
    """ROC AUC (``auc=True``), F1, sensitivity, specificity, accuracy at ``threshold`` (COVID = 1 is positive)."""
    from monai_covid.threshold_analysis import roc_auc

    y = np.asarray(labels).astype(int)
    p = np.asarray(probs, dtype=np.float64)
    pred = p >= threshold
    tp, fp = int((pred & (y == 1)).sum()), int((pred & (y == 0)).sum())
    fn, tn = int((~pred & (y == 1)).sum()), int((~pred & (y == 0)).sum())
    sens = tp / max(tp + fn, 1)
    spec = tn / max(tn + fp, 1)
    f1 = 2 * tp / max(2 * tp + fp + fn, 1)
    area = roc_auc(y, p) if auc and 0 < y.sum() < len(y) else float("nan")
    return {"auc": float(area), "f1": f1, "sensitivity": sens, "specificity": spec, "accuracy": (tp + tn) / max(len(y), 1)}


def best_f1_threshold(labels: Sequence[int], probs: Sequence[float]) -> float:
    """The cut-off (midpoint between neighbouring scores) that maximises F1; ties go to the one nearest 0.5."""
    p = np.unique(np.asarray(probs, dtype=np.float64))
    cands = np.concatenate([[0.0], (p[1:] + p[:-1]) / 2 if len(p) > 1 else [], [1.0]]) if len(p) else np.array([0.5])
    scores = [(binary_metrics(labels, probs, t, auc=False)["f1"], -abs(t - 0.5), t) for t in cands]
    return float(max(scores)[2])


def group_resamples(groups: Sequence[Any], n_boot: int = 2000, seed: int = 0) -> Iterator[np.ndarray]:
    """``n_boot`` bootstrap index arrays, each drawing as many whole groups as there are, with replacement."""
    g = np.asarray([str(v) for v in groups])
    idx = [np.nonzero(g == u)[0] for u in np.unique(g)]
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield np.concatenate([idx[i] for i in rng.integers(0, len(idx), len(idx))])


def group_bootstrap_ci(
    labels: Sequence[int],
    probs: Sequence[float],
    groups: Sequence[Any],
    metric: Callable[[np.ndarray, np.ndarray], float],
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap ``(low, high)`` of ``metric(labels, probs)`` resampling whole groups with replacement."""
    y = np.asarray(labels)
    p = np.asarray(probs, dtype=np.float64)
    vals = []
    for take in group_resamples(groups, n_boot, seed):
        if y[take].min() == y[take].max():
            continue  # one class only: AUC undefined
        v = metric(y[take], p[take])
        if not np.isnan(v):
            vals.append(v)
    if not vals:
        return float("nan"), float("nan")
    return float(np.quantile(vals, alpha / 2)), float(np.quantile(vals, 1 - alpha / 2))


def metrics_with_ci(labels, probs, groups, threshold: float, n_boot: int = 2000) -> dict[str, Any]:
    """:func:`binary_metrics` at ``threshold`` plus ``<name>_ci`` (group bootstrap) for each metric."""
    out: dict[str, Any] = dict(binary_metrics(labels, probs, threshold))
    for name in ("auc", "f1", "sensitivity", "specificity"):
        out[f"{name}_ci"] = group_bootstrap_ci(
            labels, probs, groups, lambda y, p, n=name: binary_metrics(y, p, threshold, auc=n == "auc")[n], n_boot=n_boot
        )
    out["n"] = len(labels)
    out["groups"] = len({str(g) for g in groups})
    out["threshold"] = threshold
    return out


def reliability_bins(labels: Sequence[int], probs: Sequence[float], n_bins: int = 10) -> list[dict[str, float]]:
    """Per equal-width probability bin: count, mean predicted probability, observed COVID fraction; plus ECE rows."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        m = which == b
        if m.any():
            rows.append({"bin_low": edges[b], "bin_high": edges[b + 1], "n": int(m.sum()),
                         "mean_prob": float(p[m].mean()), "observed": float(y[m].mean())})
    return rows


def expected_calibration_error(labels, probs, n_bins: int = 10) -> float:
    rows = reliability_bins(labels, probs, n_bins)
    n = sum(r["n"] for r in rows)
    return float(sum(r["n"] * abs(r["mean_prob"] - r["observed"]) for r in rows) / max(n, 1))


# ---------------------------------------------------------------------------------------------- training, scoring
def _parser(bundle: Path, overrides: dict[str, Any]):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser.update({"bundle_root": str(bundle), **overrides})
    return parser


def train_fold(bundle: Path, run_dir: Path, overrides: dict[str, Any], data_dir: str | None = None) -> dict[str, Any]:
    """Train ``train.json`` with ``overrides`` into ``run_dir/model.pt`` (fp16) and record the time spent."""
    import torch
    from monai.bundle import ConfigWorkflow

    torch.set_num_threads(1)
    run_dir.mkdir(parents=True, exist_ok=True)
    ov = {"bundle_root": str(bundle), "ckpt_dir": str(run_dir), "output_dir": str(run_dir), **overrides}
    if data_dir:
        ov["dataset_dir"] = data_dir
    ov.setdefault("val_interval", int(ov.get("epochs", 8)))  # held-out fold checked once, at the end
    wf = ConfigWorkflow(
        config_file=str(bundle / "configs" / "train.json"), meta_file=str(bundle / "configs" / "metadata.json"),
        workflow_type="train", **ov,
    )
    wf.initialize()
    t0, c0 = time.time(), time.process_time()
    wf.run()
    info = {"train_seconds": time.time() - t0, "train_cpu_seconds": time.process_time() - c0,
            "epochs": int(wf.parser.get_parsed_content("train#trainer").state.epoch)}
    (run_dir / "train_info.json").write_text(json.dumps(info, indent=1))
    wf.finalize()
    return info


def load_network(bundle: Path, weights: Path, overrides: dict[str, Any]):
    """The variant's network with the fp16 state dict ``weights`` (as float32), in eval mode."""
    import torch

    net = _parser(bundle, {k: v for k, v in overrides.items() if k.startswith("network_def") or k == "width"}).get_parsed_content(
        "network_def", instantiate=True
    )
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return net.eval()


def score_items(bundle: Path, net, items: Sequence[dict[str, Any]], overrides: dict[str, Any], batch_size: int = 16) -> np.ndarray:
    """Logits of ``net`` on ``items`` through the bundle's validation preprocessing (no augmentation)."""
    import torch

    parser = _parser(bundle, {k: v for k, v in overrides.items() if not k.startswith(("network_def", "optimizer"))})
    pre = parser.get_parsed_content("validate#preprocessing", instantiate=True)
    out = []
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            x = torch.stack([torch.as_tensor(pre(dict(d))["image"]) for d in items[i : i + batch_size]])
            out.append(net(x.float()).reshape(len(x), -1)[:, 0].numpy())
    return np.concatenate(out) if out else np.zeros(0)


def run_variant(
    bundle: Path, variant: str, work_dir: Path, data_dir: str, n_folds: int = 5, restart: bool = False,
    external: str = "ct_slices_ucsd", score_only: bool = False,
) -> Path:
    """Train (or resume) every fold of ``variant`` and write ``scores.csv`` (OOF and external logits per model).

    ``score_only``: train nothing, score the folds that have a ``model.pt`` (a partial table while runs go on)."""
    import torch

    from data_prep import datalists

    torch.set_num_threads(1)
    overrides = dict(VARIANTS[bundle.name][variant])
    vdir = work_dir / variant
    items = datalists.ct_slices_cls_grouped_datalist(data_dir, n_folds=n_folds)
    ext = datalists.ct_slices_ucsd_datalist(data_dir) if external == "ct_slices_ucsd" else []
    rows = []
    for k in range(n_folds):
        run_dir = vdir / f"fold{k}"
        if score_only and not (run_dir / "model.pt").is_file():
            continue
        if restart or not (run_dir / "model.pt").is_file():
            print(f"{variant} fold {k}: training", flush=True)
            info = train_fold(bundle, run_dir, {**overrides, "val_fold": k, "n_folds": n_folds}, data_dir)
            print(f"{variant} fold {k}: {info}", flush=True)
        net = load_network(bundle, run_dir / "model.pt", overrides)
        val = [d for d in items if d["fold"] == k]
        for d, z in zip(val, score_items(bundle, net, val, overrides)):
            rows.append({"set": "oof", "model": k, "fold": k, "image": d["image"], "label": d["label"], "group": d["group"], "logit": float(z)})
        for d, z in zip(ext, score_items(bundle, net, ext, overrides)):
            rows.append({"set": external, "model": k, "fold": -1, "image": d["image"], "label": d["label"], "group": d["group"], "logit": float(z)})
    path = vdir / "scores.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


# ----------------------------------------------------------------------------------------------------- report
def evaluate_scores(rows: list[dict[str, Any]], n_boot: int = 2000) -> dict[str, Any]:
    """Grouped-CV (nested calibration + threshold) and external (ensemble) figures from one variant's scores."""
    oof = [r for r in rows if r["set"] == "oof"]
    folds = sorted({int(r["fold"]) for r in oof})
    y = np.array([int(r["label"]) for r in oof])
    z = np.array([float(r["logit"]) for r in oof])
    f = np.array([int(r["fold"]) for r in oof])
    g = [r["group"] for r in oof]
    p_oof = np.zeros(len(oof))
    thr_oof = np.zeros(len(oof))
    for k in folds:
        tr, te = f != k, f == k
        ab = fit_platt(z[tr], y[tr])
        t = best_f1_threshold(y[tr], apply_platt(z[tr], ab))
        p_oof[te] = apply_platt(z[te], ab)
        thr_oof[te] = t
    # metrics at each fold's own threshold: compare calibrated probability with its threshold
    margin = p_oof - thr_oof
    cv = metrics_with_ci(y, margin + 0.5, g, 0.5, n_boot)  # threshold-shifted scores; AUC computed separately
    cv_auc = metrics_with_ci(y, p_oof, g, 0.5, n_boot)
    cv["auc"], cv["auc_ci"] = cv_auc["auc"], cv_auc["auc_ci"]
    cv["threshold"] = [float(thr_oof[f == k][0]) for k in folds]
    ab_all = fit_platt(z, y)
    thr_all = best_f1_threshold(y, apply_platt(z, ab_all))
    out: dict[str, Any] = {"cv": cv, "platt": ab_all, "threshold": thr_all, "oof_prob": p_oof.tolist(),
                           "oof_label": y.tolist(), "ece_oof": expected_calibration_error(y, p_oof)}
    ext = [r for r in rows if r["set"] != "oof"]
    if ext:
        images = sorted({r["image"] for r in ext})
        by_img: dict[str, list[float]] = {}
        meta: dict[str, tuple[int, str]] = {}
        for r in ext:
            by_img.setdefault(r["image"], []).append(float(r["logit"]))
            meta[r["image"]] = (int(r["label"]), r["group"])
        ye = np.array([meta[i][0] for i in images])
        ge = [meta[i][1] for i in images]
        ze = np.array([np.mean(by_img[i]) for i in images])
        pe = apply_platt(ze, ab_all)
        out["external"] = metrics_with_ci(ye, pe, ge, thr_all, n_boot)
        out["ext_prob"], out["ext_label"] = pe.tolist(), ye.tolist()
        out["ece_external"] = expected_calibration_error(ye, pe)
        per_model = []
        for m in sorted({int(r["model"]) for r in ext}):
            zm = np.array([float(r["logit"]) for r in sorted((r for r in ext if int(r["model"]) == m), key=lambda r: r["image"])])
            per_model.append(binary_metrics(ye, apply_platt(zm, ab_all), thr_all))
        out["external_single_models_mean"] = {k: float(np.mean([d[k] for d in per_model])) for k in per_model[0]}
    return out


def _read_scores(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _ci(m: dict[str, Any], name: str) -> str:
    lo, hi = m[f"{name}_ci"]
    return f"{m[name]:.3f} ({lo:.3f}–{hi:.3f})"


def report(bundle: Path, variants: Sequence[str], work_dir: Path, docs_dir: Path, command: str, n_boot: int = 2000) -> str:
    """Table (markdown), ``grouped_cv_summary.json``, ROC and reliability PNGs for ``variants``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from monai_covid.io_utils import atomic_write_json, atomic_write_text
    from monai_covid.threshold_analysis import roc_curve

    docs_dir.mkdir(parents=True, exist_ok=True)
    res = {v: evaluate_scores(_read_scores(work_dir / v / "scores.csv"), n_boot) for v in variants}
    lines = [
        "| model | grouped 5-fold CV AUC | CV F1 | CV sensitivity | CV specificity | UCSD val AUC | UCSD F1 | UCSD sensitivity | UCSD specificity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v, r in res.items():
        c, e = r["cv"], r.get("external", {})
        ext = [(_ci(e, n) if e else "—") for n in ("auc", "f1", "sensitivity", "specificity")]
        lines.append(f"| {LABELS.get(v, v)} (OOF N={c['n']}, {len(c['threshold'])} folds) | {_ci(c, 'auc')} | {_ci(c, 'f1')} | {_ci(c, 'sensitivity')} | {_ci(c, 'specificity')} | " + " | ".join(ext) + " |")
    # per-fold ROC AUC of the raw logits (each fold model on its own held-out fold)
    from monai_covid.threshold_analysis import roc_auc

    n_folds = max(len(r["cv"]["threshold"]) for r in res.values())
    lines += ["", "| model | " + " | ".join(f"fold {k} AUC" for k in range(n_folds)) + " | UCSD AUC of each fold model |",
              "|---|" + "---|" * (n_folds + 1)]
    for v in variants:
        rows = _read_scores(work_dir / v / "scores.csv")
        cells, ext_cells = [], []
        for k in range(n_folds):
            oof = [r for r in rows if r["set"] == "oof" and int(r["fold"]) == k]
            ext = [r for r in rows if r["set"] != "oof" and int(r["model"]) == k]
            cells.append(f"{roc_auc([int(r['label']) for r in oof], [float(r['logit']) for r in oof]):.3f}" if oof else "not run")
            if ext:
                ext_cells.append(f"{roc_auc([int(r['label']) for r in ext], [float(r['logit']) for r in ext]):.3f}")
        lines.append(f"| {v} | " + " | ".join(cells) + " | " + ", ".join(ext_cells) + " |")
    table = "\n".join(lines)
    atomic_write_text(docs_dir / "grouped_cv_results.md", table + f"\n\nCommand: `{command}`\n")
    summary = {v: {k: r[k] for k in r if k not in ("oof_prob", "oof_label", "ext_prob", "ext_label")} for v, r in res.items()}
    atomic_write_json(docs_dir / "grouped_cv_summary.json", {"command": command, "variants": summary})

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    n_oof = max(len(r["oof_label"]) for r in res.values())
    n_ext = max(len(r.get("ext_label", [])) for r in res.values())
    for ax, key, lab, title in ((axes[0], "oof_prob", "oof_label", f"SARS-CoV-2, grouped CV, out of fold (N={n_oof})"),
                                (axes[1], "ext_prob", "ext_label", f"UCSD COVID-CT val, cross-source (N={n_ext})")):
        for v, r in res.items():
            if key not in r:
                continue
            fpr, tpr, _ = roc_curve(r[lab], r[key])
            auc = r["cv"]["auc"] if key == "oof_prob" else r["external"]["auc"]
            ax.plot(fpr, tpr, label=f"{v} (AUC {auc:.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title)
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(docs_dir / "roc_grouped_cv_ucsd.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, key, lab, title in ((axes[0], "oof_prob", "oof_label", "grouped CV, out of fold (calibrated on the other folds)"),
                                (axes[1], "ext_prob", "ext_label", "UCSD val (calibrated on all SARS-CoV-2 OOF)")):
        for v, r in res.items():
            if key not in r:
                continue
            bins = reliability_bins(r[lab], r[key])
            ax.plot([b["mean_prob"] for b in bins], [b["observed"] for b in bins], "o-", label=v)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="predicted COVID probability (bin mean)", ylabel="observed COVID fraction", title=title, xlim=(0, 1), ylim=(0, 1))
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(docs_dir / "reliability_grouped_cv_ucsd.png", dpi=110)
    plt.close(fig)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m monai_covid.classifier_cv", description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--variant", help="train/score one variant (see VARIANTS)")
    p.add_argument("--report", nargs="+", help="variants to put in the table")
    p.add_argument("--work_dir", type=Path, required=True)
    p.add_argument("--docs_dir", type=Path)
    p.add_argument("--data_dir", default=os.environ.get("MONAI_COVID_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")))
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--restart", action="store_true", help="retrain folds that already have a model.pt")
    p.add_argument("--resume", action="store_true", help="(default) keep finished folds")
    p.add_argument("--n_boot", type=int, default=2000)
    p.add_argument("--score_only", action="store_true", help="with --variant: score the finished folds, train nothing")
    a = p.parse_args(argv)
    bundle = a.bundle.resolve()
    if a.variant:
        print(run_variant(bundle, a.variant, a.work_dir, a.data_dir, a.folds, a.restart, score_only=a.score_only))
    if a.report:
        docs = a.docs_dir or bundle / "docs" / "evaluation"
        cmd = "python -m monai_covid.classifier_cv " + " ".join(sys.argv[1:] if argv is None else argv)
        print(report(bundle, a.report, a.work_dir, docs, cmd, a.n_boot))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
