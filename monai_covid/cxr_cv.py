"""Grouped 5-fold cross-validation of the CXR infection-map bundle, and the detector fitted on out-of-fold maps.

Issue 19 (v3 of ``bundles/covid_cxr_infection_map_unet``). Three steps, each resumable::

    # 1. train every (variant, fold) on the near-duplicate-grouped folds (data_prep.datalists "cxr_infection_grouped"),
    #    one thread a run, --jobs runs at once, logs in WORK/<variant>_fold<k>.log, a checkpoint every epoch
    python -m monai_covid.cxr_cv train bundles/covid_cxr_infection_map_unet --variants slim unet --jobs 2 \\
        --work_dir /tmp/cxr_v3 [--resume]
    # 2. score each fold's last-epoch model on its held-out fold: pixel counts and detector features per X-ray
    python -m monai_covid.cxr_cv score bundles/covid_cxr_infection_map_unet --variants slim unet --work_dir /tmp/cxr_v3
    # 3. per-fold table (pixel SEN/PRE/F1/F2, detection SEN/SPE per class/F1/AUC) with the detectors fitted on the
    #    other folds' out-of-fold maps, ROC and reliability PNGs, and WORK/<variant>/detector_<rule>.json fitted on
    #    all folds
    python -m monai_covid.cxr_cv report bundles/covid_cxr_infection_map_unet --variants slim unet \\
        --work_dir /tmp/cxr_v3 --docs_dir bundles/covid_cxr_infection_map_unet/docs/v3
    # 4. the shipped candidate: the slim network on all 3,060 X-rays for the same fixed epoch count, written as an
    #    fp16 state dict to WORK/slim/final/model_fp16.pt (copied into the bundle by hand, with detector JSON, once
    #    the table says it beats the floor)
    python -m monai_covid.cxr_cv final bundles/covid_cxr_infection_map_unet --variants slim --work_dir /tmp/cxr_v3

Nothing is picked on the fold that is reported: every run trains a fixed number of epochs and its **last** epoch is
scored (``model_final.pt``; the held-out fold is looked at once, after training); each detector (calibration and
threshold) scored on fold ``k`` is fitted on the out-of-fold maps of the other folds only
(:class:`monai_covid.cxr_detector.CxrDetector`). Training runs through :func:`monai_covid.crossval.train_one`
(the bundle's ``train.json`` in a subprocess, ``OMP_NUM_THREADS=1``), so ``--resume`` continues a run from its last
epoch checkpoint and a finished run (``train_info.json``) is never retrained.

Epoch counts are set by CPU time (see the bundle docs, "v3 plan"): the stock MONAI UNet (the floor) gets the same
CPU time per fold as the slim DenseNet U-Net, so more epochs.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "VARIANTS",
    "COMMON",
    "run_overrides",
    "train",
    "train_final",
    "score",
    "inner_split",
    "attach_embeddings",
    "choose_detector",
    "oof_detection",
    "fold_metrics",
    "report",
    "pick_examples",
    "examples",
    "read_epoch_losses",
    "learning_curves",
    "main",
]

#: train.json overrides of every run (grouped folds, the CPU recipe of the shipped model, no per-epoch validation)
COMMON: dict[str, Any] = {
    "datalist_name": "cxr_infection_grouped",
    "image_size": [256, 256],
    "batch_size": 8,
    "learning_rate": 0.001,
}
#: the rows of the v3 table; ``max_epochs`` from the measured CPU seconds per step (bundle docs, "v3 plan")
VARIANTS: dict[str, dict[str, Any]] = {
    # InfectionUNet as shipped (growth 12, 24 stem features, decoder 64..8): 2.4 s a training step at 256 px with the
    # whole pipeline (1 thread, 2026-12-03 run), ~12 min an epoch of 2,448 X-rays; 10 epochs fit ~2 h
    "slim": {"max_epochs": 10},
    # the same network, weights in channels-last memory order (``channels_last`` in train.json): 1.43 instead of
    # 2.00 CPU s a step of 8 X-rays at 256 px on 1 thread (``benchmarks/cxr_v3_budget.py``; the stock UNet gains
    # nothing from it: 0.86 vs 0.82 s), so 12 epochs fit the CPU time of 10 epochs of ``slim``
    # (2.2 vs 2.6 s a step with the whole pipeline)
    "slim_cl": {"max_epochs": 12, "channels_last": True},
    # the floor: stock MONAI UNet as its tutorials build it, 1.1 s a step in the same run: 20 epochs = the same time
    "unet": {
        "max_epochs": 20,
        "network_def": {
            "_target_": "UNet",
            "spatial_dims": 2,
            "in_channels": 1,
            "out_channels": 1,
            "channels": [16, 32, 64, 128, 256],
            "strides": [2, 2, 2, 2],
            "num_res_units": 2,
        },
    },
}
LABELS = {
    "slim": "DenseNet-121 slim U-Net (InfectionUNet, 1.62 M)",
    "slim_cl": "InfectionUNet slim, channels-last, 12 epochs (same CPU time)",
    "unet": "stock MONAI UNet 16-256, 2 res units (floor)",
}
DETECTORS = ("paper", "logistic_image", "logistic_lung")
#: detectors that also read the network's pooled encoder features (``score`` saves them per fold); reported when
#: every scored X-ray has its embedding. ``auto`` chooses between ``logistic_image`` and ``logistic_embed`` by an
#: inner 5-fold CV (log-loss, whole groups) on its own fitting rows.
EMBED_DETECTORS = ("logistic_embed", "auto")
AUTO_CANDIDATES = ("logistic_image", "logistic_embed")


def _subsample_expr(part: str, every: int) -> str:
    return f"$make_datalist(@datalist_name, @dataset_dir, fold=@fold, n_folds=@n_folds, part='{part}')[::{every}]"


def run_overrides(
    variant: str,
    fold: int,
    data_dir: str,
    n_folds: int = 5,
    resume: bool = False,
    every: int = 1,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``train.json`` overrides of one CV run: ``COMMON``, the variant, the fold; the held-out fold is validated once,
    after the last epoch (``val_interval`` = ``max_epochs``), and early stopping is off. ``every`` > 1 keeps every
    ``every``-th X-ray (smoke runs)."""
    ov: dict[str, Any] = {**COMMON, **VARIANTS[variant], **(extra or {})}
    epochs = int(ov["max_epochs"])
    ov.update(
        {
            "dataset_dir": data_dir,
            "fold": fold,
            "n_folds": n_folds,
            "resume": resume,
            "val_interval": epochs,
            "early_stop_patience": epochs + 1,
        }
    )
    if every > 1:
        ov["train_datalist"] = _subsample_expr("train", every)
        ov["val_datalist"] = _subsample_expr("val", every)
    return ov


def train(
    bundle: Path,
    variants: Sequence[str],
    folds: Sequence[int],
    work_dir: Path,
    data_dir: str,
    n_folds: int = 5,
    jobs: int = 2,
    resume: bool = False,
    every: int = 1,
    extra: dict[str, Any] | None = None,
) -> None:
    """Train (or resume, or skip when finished) every (variant, fold) run, ``jobs`` at once, one thread each."""
    from monai_covid.crossval import _run_all

    todo = []
    for v in variants:
        for k in folds:
            ov = run_overrides(v, k, data_dir, n_folds, resume, every, extra)
            todo.append(((v, k), work_dir / v / f"fold{k}", ov, work_dir / f"{v}_fold{k}.log"))
    work_dir.mkdir(parents=True, exist_ok=True)
    _run_all(todo, bundle, jobs)


def train_final(
    bundle: Path, variant: str, work_dir: Path, data_dir: str, resume: bool = False, extra: dict[str, Any] | None = None
) -> Path:
    """Train ``variant`` on every X-ray of the training set (no held-out fold; the fixed epoch count of the CV) and
    write its last epoch as an fp16 state dict ``WORK/<variant>/final/model_fp16.pt``. The end-of-run validation
    sees only 3 X-rays of the training set (a smoke check that the network runs, no selection)."""
    from monai_covid.crossval import _run_all
    from monai_covid.io_utils import save_fp16

    ov = run_overrides(variant, 0, data_dir, resume=resume, extra=extra)
    ov.update(
        fold=None,
        train_datalist="$make_datalist(@datalist_name, @dataset_dir, part='all')",
        val_datalist="$make_datalist(@datalist_name, @dataset_dir, part='all')[::1020]",
    )
    run_dir = work_dir / variant / "final"
    _run_all([((variant, "final"), run_dir, ov, work_dir / f"{variant}_final.log")], bundle, 1)
    if not (run_dir / "model_final.pt").is_file():
        raise SystemExit(f"[cxr_cv] {variant} final: not finished ({run_dir}); rerun with --resume")
    return save_fp16(run_dir / "model_final.pt", run_dir / "model_fp16.pt")


# ------------------------------------------------------------------------------------------------------- scoring


def score(
    bundle: Path,
    variants: Sequence[str],
    folds: Sequence[int],
    work_dir: Path,
    data_dir: str,
    n_folds: int = 5,
    every: int = 1,
    extra: dict[str, Any] | None = None,
) -> list[Path]:
    """``WORK/<variant>/oof.csv``: per held-out X-ray the pixel counts at p >= 0.5 (against the infection mask, at
    the mask's size, through :func:`monai_covid.infection_map.predict_cxr` as in inference) and the detector features
    of the map over the whole image (``img_*``) and inside the data set's lung mask (``lung_*``); ``*_lung`` pixel
    counts are those of the map cut to the lung mask (an upper bound for a predicted lung mask). Rows of folds
    not scored in this call are kept. ``WORK/<variant>/fold<k>/oof_embed.npz``: the pooled encoder features of the
    same forward passes (``image``, ``embedding`` ``(N, C)``, ``layer``;
    :class:`monai_covid.cxr_detector.EmbeddingTap`).
    """
    import torch

    from data_prep.datalists import make_datalist
    from monai_covid.crossval import load_run
    from monai_covid.cxr_detector import EmbeddingTap, find_embedding_layer, map_features
    from monai_covid.infection_map import predict_cxr, read_mask, read_xray
    from monai_covid.io_utils import atomic_write_csv

    torch.set_num_threads(1)
    out = []
    for v in variants:
        rows = [r for r in _read_oof(work_dir / v) if int(r["fold"]) not in set(folds)]
        for k in folds:
            run_dir = work_dir / v / f"fold{k}"
            if not (run_dir / "model_final.pt").is_file():
                print(f"[cxr_cv] {v} fold {k}: no model_final.pt, not scored", flush=True)
                continue
            ov = run_overrides(v, k, data_dir, n_folds, every=every, extra=extra)
            net = load_run(bundle, run_dir, ov, "final")
            if ov.get("channels_last", False):  # timed in the memory order it trains and is shipped in
                net = net.to(memory_format=torch.channels_last)
            items = make_datalist(ov["datalist_name"], data_dir, fold=k, n_folds=n_folds, part="val")[:: max(every, 1)]
            layer = find_embedding_layer(net)
            tap = EmbeddingTap(net, layer).attach()
            names, embeddings = [], []
            for d in items:
                image = read_xray(d["image"])
                t0 = time.perf_counter()  # forward + sigmoid + resize back, one thread, file reading excluded
                pr = predict_cxr(net, image, image_size=tuple(ov["image_size"]))["prob"]
                ms = 1000 * (time.perf_counter() - t0)
                names.append(Path(d["image"]).name)
                embeddings.append(tap.value[0])
                gt, lung = read_mask(d["label"]) > 0.5, read_mask(d["lung"])
                hot = pr >= 0.5
                row = {
                    "variant": v,
                    "fold": k,
                    "image": Path(d["image"]).name,
                    "class_name": d["class_name"],
                    "covid": d["covid"],
                    "group": d["group"],
                    "tp": int((hot & gt).sum()),
                    "fp": int((hot & ~gt).sum()),
                    "fn": int((~hot & gt).sum()),
                    "tn": int((~hot & ~gt).sum()),
                    # the map restricted to the data set's lung mask: does cutting it to the lungs help?
                    "tp_lung": int((hot & gt & (lung > 0.5)).sum()),
                    "fp_lung": int((hot & ~gt & (lung > 0.5)).sum()),
                    "fn_lung": int(((~hot | (lung <= 0.5)) & gt).sum()),
                    "ms": f"{ms:.1f}",
                }
                row.update({f"img_{n}": f"{x:.6g}" for n, x in map_features(pr).items()})
                row.update({f"lung_{n}": f"{x:.6g}" for n, x in map_features(pr, lung).items()})
                rows.append(row)
            tap.remove()
            _save_embeddings(run_dir / "oof_embed.npz", names, np.stack(embeddings), layer)
            print(f"[cxr_cv] {v} fold {k}: {len(items)} X-rays scored", flush=True)
        if rows:
            rows.sort(key=lambda r: int(r["fold"]))
            out.append(atomic_write_csv(work_dir / v / "oof.csv", rows, list(rows[0])))
    return out


def _read_oof(variant_dir: Path) -> list[dict[str, Any]]:
    path = variant_dir / "oof.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _save_embeddings(path: Path, names: Sequence[str], embeddings: np.ndarray, layer: str) -> Path:
    import io

    from monai_covid.io_utils import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, image=np.asarray(names), embedding=embeddings.astype(np.float32), layer=np.asarray(layer))
    return atomic_write_bytes(path, buf.getvalue())


def attach_embeddings(rows: Sequence[dict[str, Any]], variant_dir: Path) -> bool:
    """Add ``_embedding`` (``(C,)``) and ``_layer`` to every row from ``variant_dir/fold<k>/oof_embed.npz``; ``True``
    when every row got one (the embedding detectors are then reported)."""
    cache: dict[int, tuple[dict[str, np.ndarray], str]] = {}
    for r in rows:
        k = int(r["fold"])
        if k not in cache:
            path = variant_dir / f"fold{k}" / "oof_embed.npz"
            if not path.is_file():
                return False
            z = np.load(path)
            cache[k] = (dict(zip(z["image"].tolist(), z["embedding"])), str(z["layer"]))
        table, layer = cache[k]
        if r["image"] not in table:
            return False
        r["_embedding"], r["_layer"] = table[r["image"]], layer
    return bool(rows)


# -------------------------------------------------------------------------------------------------------- report
def _features(rows: Sequence[dict[str, Any]], prefix: str) -> list[dict[str, float]]:
    from monai_covid.cxr_detector import FEATURES

    return [{n: float(r[f"{prefix}_{n}"]) for n in FEATURES} for r in rows]


def _embeddings(rows: Sequence[dict[str, Any]]) -> np.ndarray:
    return np.stack([np.asarray(r["_embedding"], dtype=np.float64) for r in rows])


def _detector(name: str, rows: Sequence[dict[str, Any]], min_specificity: float):
    from monai_covid.cxr_detector import CxrDetector

    if name == "paper":
        return CxrDetector.paper()
    if name == "auto":
        return choose_detector(rows, min_specificity)
    prefix = "lung" if name == "logistic_lung" else "img"
    embed = name == "logistic_embed"
    return CxrDetector.fit(
        _features(rows, prefix),
        [int(r["covid"]) for r in rows],
        [r["class_name"] for r in rows],
        min_specificity=min_specificity,
        use_lung=prefix == "lung",
        embeddings=_embeddings(rows) if embed else None,
        embedding_layer=str(rows[0]["_layer"]) if embed else "",
    )


def _probabilities(det, name: str, rows: Sequence[dict[str, Any]]) -> np.ndarray:
    emb = _embeddings(rows) if det.needs_embedding else None
    return det.probability(_features(rows, "lung" if name == "logistic_lung" else "img"), emb)


def choose_detector(
    rows: Sequence[dict[str, Any]],
    min_specificity: float,
    candidates: Sequence[str] = AUTO_CANDIDATES,
    n_inner: int = 5,
):
    """Detector ``auto``: each candidate's out-of-sub-fold probabilities over :func:`inner_split` sub-folds of
    ``rows`` (whole groups), the one with the lowest mean log-loss refitted on all ``rows``; the choice and the
    losses are kept in ``info["auto"]``. Sees nothing but ``rows``, so it can be nested in any held-out scoring."""
    y = np.array([int(r["covid"]) for r in rows], dtype=np.float64)
    sub = inner_split(rows, n_inner)
    losses = {}
    for name in candidates:
        p = np.zeros(len(rows))
        for j in range(n_inner):
            fit_rows = [r for r, s in zip(rows, sub) if s != j]
            idx = np.nonzero(sub == j)[0]
            if not len(idx):
                continue
            p[idx] = _probabilities(_detector(name, fit_rows, min_specificity), name, [rows[i] for i in idx])
        p = np.clip(p, 1e-6, 1 - 1e-6)
        losses[name] = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    best = min(candidates, key=lambda n: losses[n])
    det = _detector(best, rows, min_specificity)
    det.info["auto"] = {"chosen": best, "inner_log_loss": losses, "n_inner": n_inner}
    return det


def inner_split(rows: Sequence[dict[str, Any]], n_inner: int = 5) -> np.ndarray:
    """Sub-fold index per row for cross-fitting inside one held-out fold: whole near-duplicate groups, dealt
    round-robin within each class (groups ordered by class, then id), so every sub-fold has every class."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(str(r.get("group", i)), []).append(i)
    order = sorted(groups, key=lambda g: (str(rows[groups[g][0]]["class_name"]), g))
    sub = np.zeros(len(rows), dtype=int)
    seen: dict[str, int] = {}
    for g in order:
        c = str(rows[groups[g][0]]["class_name"])
        sub[groups[g]] = seen.get(c, 0) % n_inner
        seen[c] = seen.get(c, 0) + 1
    return sub


def oof_detection(
    test: Sequence[dict[str, Any]], rest: Sequence[dict[str, Any]], name: str, min_specificity: float, n_inner: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """``(probability, threshold)`` per row of ``test``, from detector ``name`` never fitted on that row: fitted on
    ``rest`` (the other folds' out-of-fold maps) or, when ``rest`` is empty (one fold trained), cross-fitted inside
    ``test`` over :func:`inner_split` sub-folds of whole groups."""
    from monai_covid.cxr_detector import CxrDetector

    if name == "paper":
        det = CxrDetector.paper()
        return _probabilities(det, name, test), np.full(len(test), det.threshold)
    if rest:
        det = _detector(name, rest, min_specificity)
        return _probabilities(det, name, test), np.full(len(test), det.threshold)
    sub = inner_split(test, n_inner)
    prob, thr = np.zeros(len(test)), np.zeros(len(test))
    for j in range(n_inner):
        fit_rows = [r for r, s in zip(test, sub) if s != j]
        idx = np.nonzero(sub == j)[0]
        if not len(idx):
            continue
        det = _detector(name, fit_rows, min_specificity)
        prob[idx] = _probabilities(det, name, [test[i] for i in idx])
        thr[idx] = det.threshold
    return prob, thr


def _pixel_metrics(pos: Sequence[dict[str, Any]]) -> dict[str, float]:
    tp, fp, fn = (sum(int(r[c]) for r in pos) for c in ("tp", "fp", "fn"))
    sen, pre = tp / max(tp + fn, 1), tp / max(tp + fp, 1)
    m = {
        "pixel_sen": sen,
        "pixel_pre": pre,
        "pixel_f1": 2 * tp / max(2 * tp + fp + fn, 1),
        "pixel_f2": 5 * pre * sen / max(4 * pre + sen, 1e-12),
        "pixel_f1_in_lung": float("nan"),
    }
    if pos and "tp_lung" in pos[0]:
        tl, fl, nl = (sum(int(r[c]) for r in pos) for c in ("tp_lung", "fp_lung", "fn_lung"))
        m["pixel_f1_in_lung"] = 2 * tl / max(2 * tl + fl + nl, 1)
    return m


def _detection_metrics(y: np.ndarray, cls: np.ndarray, p: np.ndarray, hit: np.ndarray) -> dict[str, float]:
    from monai_covid.threshold_analysis import roc_auc

    tpd, fpd = int((hit & (y == 1)).sum()), int((hit & (y == 0)).sum())
    fnd = int((~hit & (y == 1)).sum())
    m = {
        "det_sen": tpd / max((y == 1).sum(), 1),
        "det_spe": 1 - fpd / max((y == 0).sum(), 1),
        "det_f1": 2 * tpd / max(2 * tpd + fpd + fnd, 1),
        "det_auc": roc_auc(y, p) if 0 < y.sum() < len(y) else float("nan"),
    }
    for c in ("non_covid", "normal"):
        neg = cls == c
        m[f"spe_{c}"] = float(1 - hit[neg].mean()) if neg.any() else float("nan")
    return m


def _fold_row_metrics(test: Sequence[dict[str, Any]], p: np.ndarray, thr: np.ndarray) -> dict[str, float]:
    y = np.array([int(r["covid"]) for r in test])
    cls = np.array([r["class_name"] for r in test])
    return {**_pixel_metrics([r for r in test if int(r["covid"])]), **_detection_metrics(y, cls, p, p >= thr)}


def _group_bootstrap(
    test: Sequence[dict[str, Any]], p: np.ndarray, thr: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """95 % percentile CI of every figure of :func:`_fold_row_metrics`, resampling whole near-duplicate groups."""
    from monai_covid.classifier_cv import group_resamples

    vals: dict[str, list[float]] = {}
    for take in group_resamples([r.get("group", i) for i, r in enumerate(test)], n_boot, seed):
        for k, v in _fold_row_metrics([test[i] for i in take], p[take], thr[take]).items():
            if not np.isnan(v):
                vals.setdefault(k, []).append(v)
    return {k: (float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))) for k, v in vals.items()}


def _detectors(rows: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    return DETECTORS + (EMBED_DETECTORS if rows and all("_embedding" in r for r in rows) else ())


def fold_metrics(
    rows: Sequence[dict[str, Any]], min_specificity: float = 0.98, n_boot: int = 0
) -> list[dict[str, Any]]:
    """Per (fold, detector): pixel SEN/PRE/F1/F2 pooled over the fold's COVID X-rays, and detection figures with the
    detector fitted on the other folds (the paper's rule needs no fitting); with a single fold, the detector is
    cross-fitted inside it (:func:`oof_detection`). ``n_boot`` > 0 adds ``<figure>_ci`` (group bootstrap)."""
    rows = list(rows)
    folds = sorted({int(r["fold"]) for r in rows})
    out = []
    for k in folds:
        test = [r for r in rows if int(r["fold"]) == k]
        rest = [r for r in rows if int(r["fold"]) != k]
        for name in _detectors(rows):
            pool = rest or test
            if name != "paper" and len({int(r["covid"]) for r in pool}) < 2:
                continue
            p, thr = oof_detection(test, rest, name, min_specificity)
            ms = [float(r["ms"]) for r in test if r.get("ms") not in (None, "")]
            m = {
                "fold": k,
                "detector": name,
                "n": len(test),
                "groups": len({str(r.get("group", i)) for i, r in enumerate(test)}),
                "fitted_on": "other folds" if rest else ("none" if name == "paper" else "inner 5-fold, by group"),
                "threshold": float(np.median(thr)),
                **_fold_row_metrics(test, p, thr),
                "ms_per_image": float(np.mean(ms)) if ms else float("nan"),
            }
            if n_boot:
                m.update({f"{c}_ci": ci for c, ci in _group_bootstrap(test, p, thr, n_boot).items()})
            out.append(m)
    return out


_COLS = (
    "pixel_sen",
    "pixel_pre",
    "pixel_f1",
    "pixel_f2",
    "det_sen",
    "det_spe",
    "spe_non_covid",
    "spe_normal",
    "det_f1",
    "det_auc",
    "ms_per_image",
    "pixel_f1_in_lung",
)


def _cell(m: dict[str, Any], c: str) -> str:
    ci = m.get(f"{c}_ci")
    return f"{m[c]:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")


def _bounds(column: str) -> tuple[float, float] | None:
    """Range of a table column, to which its t-interval is clipped: every column but the time is a proportion."""
    return None if column == "ms_per_image" else (0.0, 1.0)


def report(
    variants: Sequence[str],
    work_dir: Path,
    docs_dir: Path,
    command: str,
    min_specificity: float = 0.98,
    n_boot: int | None = None,
) -> str:
    """``cv_v3_results.md`` / ``.json`` (per fold, mean ± sd, Student-t 95 % CI over folds; with a single fold, 95 %
    group-bootstrap CIs in each cell), ``roc_reliability_v3.png``, ``WORK/<variant>/oof_detection.csv`` (each X-ray's
    out-of-fold COVID probability per detector) and ``WORK/<variant>/detector_<rule>.json`` (each detector fitted on
    all out-of-fold maps: the one to ship)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from monai_covid.classifier_cv import reliability_bins
    from monai_covid.crossval import _ci95, _mean_sd
    from monai_covid.io_utils import atomic_write_csv, atomic_write_json, atomic_write_text
    from monai_covid.threshold_analysis import roc_curve

    docs_dir.mkdir(parents=True, exist_ok=True)
    lines = ["| model | detector | fold | N | " + " | ".join(_COLS) + " |", "|---|---|---|---|" + "---|" * len(_COLS)]
    summary: dict[str, Any] = {"command": command, "min_specificity": min_specificity, "variants": {}}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    single = False
    for v in variants:
        rows = _read_oof(work_dir / v)
        attach_embeddings(rows, work_dir / v)
        folds = sorted({int(r["fold"]) for r in rows})
        single = len(folds) == 1
        boot = (1000 if single else 0) if n_boot is None else n_boot
        per_fold = fold_metrics(rows, min_specificity, n_boot=boot)
        summary["variants"][v] = {"per_fold": per_fold, "n": len(rows)}
        det_rows = [{k: r[k] for k in ("fold", "image", "group", "class_name", "covid")} for r in rows]
        for name in _detectors(rows):
            fr = [m for m in per_fold if m["detector"] == name]
            for m in fr:
                lines.append(
                    f"| {LABELS.get(v, v)} | {name} | {m['fold']} | {m['n']} | "
                    + " | ".join(_cell(m, c) for c in _COLS)
                    + " |"
                )
            if len(fr) > 1:
                lines.append(
                    f"| {LABELS.get(v, v)} | {name} | mean ± sd (95 % CI) | {sum(m['n'] for m in fr)} | "
                    + " | ".join(
                        f"{_mean_sd([m[c] for m in fr])} ({_ci95([m[c] for m in fr], _bounds(c))})" for c in _COLS
                    )
                    + " |"
                )
            if name != "paper" and len({int(r["covid"]) for r in rows}) == 2:
                det = _detector(name, rows, min_specificity)
                det.save(work_dir / v / f"detector_{name}.json")
                if "auto" in det.info:  # what the detector fitted on every scored X-ray (the one to ship) chose
                    summary["variants"][v]["auto_on_all"] = det.info["auto"]
            # out-of-fold probabilities of the nested (or cross-fitted) detectors, for the curves and examples
            y, p = [], []
            at = {}
            for k in folds:
                test = [r for r in rows if int(r["fold"]) == k]
                rest = [r for r in rows if int(r["fold"]) != k]
                if name != "paper" and len({int(r["covid"]) for r in (rest or test)}) < 2:
                    continue
                pk, tk = oof_detection(test, rest, name, min_specificity)
                p += pk.tolist()
                y += [int(r["covid"]) for r in test]
                at.update({(int(r["fold"]), r["image"]): (a, b) for r, a, b in zip(test, pk, tk)})
            for r in det_rows:
                a, b = at.get((int(r["fold"]), r["image"]), (float("nan"), float("nan")))
                r[f"{name}_probability"], r[f"{name}_detected"] = f"{a:.6g}", int(a >= b) if a == a else ""
            if y and 0 < sum(y) < len(y):
                fpr, tpr, _ = roc_curve(y, p)
                axes[0].plot(fpr, tpr, label=f"{v} / {name}")
                bins = reliability_bins(y, p)
                axes[1].plot([b["mean_prob"] for b in bins], [b["observed"] for b in bins], "o-", label=f"{v} / {name}")
        atomic_write_csv(work_dir / v / "oof_detection.csv", det_rows, list(det_rows[0]))
    for ax, (xl, yl) in zip(
        axes, (("1 - specificity", "sensitivity"), ("predicted COVID probability", "observed COVID fraction"))
    ):
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel=xl, ylabel=yl, xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=7)
    where = "held-out grouped fold, detectors cross-fitted inside it by group" if single else "grouped CV, out of fold"
    axes[0].set_title(f"{where} (COVID vs Non-COVID + Normal)", fontsize=8)
    axes[1].set_title("reliability of the out-of-fold detector probability", fontsize=8)
    fig.tight_layout()
    fig.savefig(docs_dir / "roc_reliability_v3.png", dpi=100)
    plt.close(fig)
    ci = (
        "95 % CI in brackets: percentile bootstrap over near-duplicate groups (1,000 resamples)"
        if single
        else "95 % CI: Student t over the fold values"
    )
    table = "\n".join(lines) + f"\n\n{ci}. Command: `{command}`\n"
    atomic_write_text(docs_dir / "cv_v3_results.md", table)
    atomic_write_json(docs_dir / "cv_v3_results.json", summary)
    return table


def pick_examples(det_rows: Sequence[dict[str, Any]], detector: str = "logistic_image") -> list[tuple[str, dict]]:
    """Example X-rays for the docs from ``oof_detection.csv`` rows, one per outcome of ``detector`` (each the most
    confident of its kind): a true alarm, a missed COVID-19 X-ray, a Non-COVID X-ray that the paper's rule calls
    COVID and the detector spares, and the detector's most confident false alarm on each negative class."""
    prob = f"{detector}_probability"
    rows = [r for r in det_rows if r.get(prob) not in (None, "", "nan")]
    hit = {id(r): int(r[f"{detector}_detected"]) for r in rows}
    kinds = [
        ("true alarm", lambda r: int(r["covid"]) and hit[id(r)], True),
        ("missed COVID-19", lambda r: int(r["covid"]) and not hit[id(r)], False),
        (
            "spared Non-COVID (paper rule fires)",
            lambda r: r["class_name"] == "non_covid" and not hit[id(r)] and int(r.get("paper_detected") or 0),
            False,
        ),
        ("false alarm, Non-COVID", lambda r: r["class_name"] == "non_covid" and hit[id(r)], True),
        ("false alarm, Normal", lambda r: r["class_name"] == "normal" and hit[id(r)], True),
    ]
    out = []
    for title, keep, high in kinds:
        cand = sorted((r for r in rows if keep(r)), key=lambda r: float(r[prob]), reverse=high)
        if cand:
            out.append((title, cand[0]))
    return out


def examples(
    bundle: Path,
    variant: str,
    work_dir: Path,
    data_dir: str,
    figure: Path,
    detector: str = "logistic_image",
    n_folds: int = 5,
) -> Path:
    """``figure``: X-ray | ground truth | infection map of :func:`pick_examples`, each through the fold model that
    did not train on it, titled with its class, out-of-fold COVID probability and both detectors' calls."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from data_prep.datalists import make_datalist
    from monai_covid.crossval import load_run
    from monai_covid.infection_map import predict_cxr, read_mask, read_xray
    from monai_covid.io_utils import atomic_save_figure

    with open(work_dir / variant / "oof_detection.csv", newline="") as f:
        picks = pick_examples(list(csv.DictReader(f)), detector)
    fig, axes = plt.subplots(len(picks), 3, figsize=(7.5, 2.5 * len(picks)), dpi=80, squeeze=False)
    nets: dict[int, Any] = {}
    for row, (title, r) in zip(axes, picks):
        k = int(r["fold"])
        ov = run_overrides(variant, k, data_dir, n_folds)
        if k not in nets:
            nets[k] = load_run(bundle, work_dir / variant / f"fold{k}", ov, "final")
        item = next(
            d
            for d in make_datalist(ov["datalist_name"], data_dir, fold=k, n_folds=n_folds, part="val")
            if Path(d["image"]).name == r["image"]
        )
        image = read_xray(item["image"])
        res = predict_cxr(nets[k], image, image_size=tuple(ov["image_size"]))
        row[0].imshow(image, cmap="gray", vmin=0, vmax=1)
        row[1].imshow(image, cmap="gray", vmin=0, vmax=1)
        gt = read_mask(item["label"])
        if gt.any():
            row[1].contour(gt, levels=[0.5], colors="yellow", linewidths=0.8)
        row[1].contour(read_mask(item["lung"]), levels=[0.5], colors="cyan", linewidths=0.5)
        row[2].imshow(res["map"])
        row[0].set_ylabel(f"{title}\n{r['class_name']}", fontsize=7)
        row[2].set_title(
            f"p(COVID) {float(r[f'{detector}_probability']):.2f}; detector "
            f"{'yes' if int(r[f'{detector}_detected']) else 'no'}, paper rule "
            f"{'yes' if int(r.get('paper_detected') or 0) else 'no'}",
            fontsize=7,
        )
        for ax in row:
            ax.set_xticks([]), ax.set_yticks([])
    for ax, t in zip(axes[0], ("X-ray", "infection (yellow), lung (cyan) masks", "")):
        if t:
            ax.set_title(t, fontsize=8)
    fig.tight_layout()
    return atomic_save_figure(fig, figure)


_ITER_LOSS = re.compile(r"Epoch: (\d+)/\d+, Iter: (\d+)/\d+ -- train_loss: ([-\d.eE+naNif]+)")


def read_epoch_losses(log_path: str | Path) -> list[tuple[int, float]]:
    """``(epoch, mean training loss)`` from a run's log (``StatsHandler`` iteration lines). A resumed run repeats the
    iterations of the epoch it was stopped in; the later pass of an iteration replaces the earlier one."""
    losses: dict[int, dict[int, float]] = {}
    for line in Path(log_path).read_text(errors="replace").splitlines():
        m = _ITER_LOSS.search(line)
        if m:
            losses.setdefault(int(m.group(1)), {})[int(m.group(2))] = float(m.group(3))
    return [(e, float(np.mean(list(v.values())))) for e, v in sorted(losses.items())]


def learning_curves(variants: Sequence[str], work_dir: Path, path: Path) -> Path:
    """``path`` (PNG): mean training loss by epoch of every fold run (``WORK/<variant>_fold<k>.log``), and each run's
    end-of-training validation Dice on its held-out fold (the bundle's ``val_mean_dice``, 256 px, the only time the
    held-out fold is looked at)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from monai_covid.io_utils import atomic_save_figure
    from monai_covid.semi_supervised import read_epoch_metrics

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=90)
    for i, v in enumerate(variants):
        logs = sorted(work_dir.glob(f"{v}_fold*.log"))
        for j, log in enumerate(logs):
            curve = read_epoch_losses(log)
            axes[0].plot(*zip(*curve), color=f"C{i}", lw=1, alpha=0.7, label=LABELS.get(v, v) if j == 0 else None)
            val = [r["val_mean_dice"] for r in read_epoch_metrics(log) if "val_mean_dice" in r]
            if val:
                axes[1].plot(i, val[-1], "o", color=f"C{i}", alpha=0.7)
    axes[1].set_xticks(range(len(variants)), [LABELS.get(v, v).split(",")[0] for v in variants], fontsize=7)
    axes[1].set_xlim(-0.5, len(variants) - 0.5)
    axes[0].set_title("training loss (Dice + focal), mean over each epoch, 5 folds", fontsize=8)
    axes[0].set_xlabel("epoch", fontsize=8)
    axes[0].legend(fontsize=6)
    axes[1].set_title("held-out fold, after the last epoch: mean Dice (256 px)", fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return atomic_save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m monai_covid.cxr_cv", description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=("train", "score", "report", "all", "final", "examples", "curves"))
    p.add_argument("bundle", type=Path)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--n_folds", type=int, default=5)
    p.add_argument("--data_dir", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    p.add_argument("--work_dir", type=Path, required=True)
    p.add_argument("--docs_dir", type=Path, default=None, help="default: WORK/report")
    p.add_argument("--jobs", type=int, default=2, help="training runs at once (one thread each)")
    p.add_argument("--resume", action="store_true", help="continue unfinished runs from their last epoch checkpoint")
    p.add_argument("--every", type=int, default=1, help="keep every N-th X-ray (smoke runs only)")
    p.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=JSON", help="extra train.json overrides (e.g. max_epochs=1)"
    )
    p.add_argument("--min_specificity", type=float, default=0.98, help="per negative class, on training folds")
    a = p.parse_args(argv)
    bundle = a.bundle.resolve()
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)}
    if a.step in ("train", "all"):
        train(bundle, a.variants, a.folds, a.work_dir, a.data_dir, a.n_folds, a.jobs, a.resume, a.every, extra)
    if a.step in ("score", "all"):
        score(bundle, a.variants, a.folds, a.work_dir, a.data_dir, a.n_folds, a.every, extra)
    if a.step == "final":
        for v in a.variants:
            print(train_final(bundle, v, a.work_dir, a.data_dir, a.resume, extra))
    if a.step == "examples":
        for v in a.variants:
            print(
                examples(bundle, v, a.work_dir, a.data_dir, (a.docs_dir or a.work_dir / "report") / f"examples_{v}.png")
            )
    if a.step == "curves":
        print(learning_curves(a.variants, a.work_dir, (a.docs_dir or a.work_dir / "report") / "learning_curves.png"))
    if a.step in ("report", "all"):
        print(
            report(
                a.variants,
                a.work_dir,
                a.docs_dir or a.work_dir / "report",
                "python -m monai_covid.cxr_cv " + " ".join(argv),
                a.min_specificity,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
