"""Binary classifier analysis: threshold sweep, ROC and precision-recall curves, confusion matrix (CSV + PNG).

COVID CT-Net (arXiv:2009.05096) Sec. IV-D sweeps the cut-off threshold from 0.1 to 0.9 and reports sensitivity,
specificity and F1 (Table III); Sec. IV-E shows the ROC curve, the precision-recall curve and the confusion
matrix, Sec. IV-C the histograms of predicted scores. This module computes the same for any binary classifier.

A case is called positive when ``probability >= threshold``. Counts and the derived metrics come from MONAI
(:func:`monai.metrics.get_confusion_matrix`, :func:`~monai.metrics.compute_confusion_matrix_metric`), ROC AUC from
:func:`monai.metrics.compute_roc_auc`; a metric whose denominator is zero is ``nan``. MONAI has no
precision-recall curve, so the curve and its area (average precision, the step-wise sum
``sum_k (R_k - R_{k-1}) P_k``, as scikit-learn defines it) are computed here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from monai_covid.io_utils import atomic_save_figure, atomic_write_csv, atomic_write_text

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = [
    "PAPER_THRESHOLDS",
    "confusion_counts",
    "threshold_sweep",
    "roc_curve",
    "pr_curve",
    "roc_auc",
    "average_precision",
    "sweep_markdown",
    "save_threshold_report",
    "ThresholdReportHandler",
]

PAPER_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SWEEP_METRICS = {
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "precision": "precision",
    "f1": "f1 score",
    "accuracy": "accuracy",
}


def _as_arrays(y_true: Sequence[float] | np.ndarray | torch.Tensor, y_prob: Sequence[float] | np.ndarray | torch.Tensor):
    t = np.asarray(y_true.detach().cpu() if torch.is_tensor(y_true) else y_true, dtype=np.float64).reshape(-1)
    p = np.asarray(y_prob.detach().cpu() if torch.is_tensor(y_prob) else y_prob, dtype=np.float64).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"{t.size} labels but {p.size} probabilities")
    if t.size == 0:
        raise ValueError("no cases to analyse")
    if not np.isin(t, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(p).all():
        raise ValueError("probabilities must be finite")
    return t, p


def confusion_counts(y_true, y_prob, threshold: float = 0.5) -> dict[str, int]:
    """``{"tp", "fp", "tn", "fn"}`` for the positive class when calling ``y_prob >= threshold`` positive."""
    from monai.metrics import get_confusion_matrix

    t, p = _as_arrays(y_true, y_prob)
    pred = torch.as_tensor(p >= threshold, dtype=torch.float32)[:, None]  # compared in float64
    cm = get_confusion_matrix(pred, torch.as_tensor(t, dtype=torch.float32)[:, None]).sum(dim=0)[0]
    return {k: int(v) for k, v in zip(("tp", "fp", "tn", "fn"), cm.tolist())}


def threshold_sweep(y_true, y_prob, thresholds: Sequence[float] = PAPER_THRESHOLDS) -> list[dict[str, float]]:
    """One row per threshold: counts and sensitivity, specificity, precision, F1, accuracy (paper Table III)."""
    from monai.metrics import compute_confusion_matrix_metric

    rows = []
    for thr in thresholds:
        c = confusion_counts(y_true, y_prob, thr)
        cm = torch.tensor([[c["tp"], c["fp"], c["tn"], c["fn"]]], dtype=torch.float64)
        row: dict[str, float] = {"threshold": float(thr), **c}
        for key, name in SWEEP_METRICS.items():
            row[key] = float(compute_confusion_matrix_metric(name, cm)[0])
        rows.append(row)
    return rows


def _ranked(t: np.ndarray, p: np.ndarray):
    order = np.argsort(-p, kind="mergesort")
    p, t = p[order], t[order]
    last_of_tie = np.r_[np.where(np.diff(p))[0], t.size - 1]
    tps = np.cumsum(t)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return tps, fps, p[last_of_tie]


def roc_curve(y_true, y_prob) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), starting at (0, 0) with threshold ``inf``."""
    t, p = _as_arrays(y_true, y_prob)
    tps, fps, thr = _ranked(t, p)
    n_pos, n_neg = t.sum(), t.size - t.sum()
    tpr = np.r_[0.0, tps / n_pos] if n_pos else np.full(tps.size + 1, np.nan)
    fpr = np.r_[0.0, fps / n_neg] if n_neg else np.full(fps.size + 1, np.nan)
    return fpr, tpr, np.r_[np.inf, thr]


def pr_curve(y_true, y_prob) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) for decreasing thresholds, one point per distinct score."""
    t, p = _as_arrays(y_true, y_prob)
    tps, fps, thr = _ranked(t, p)
    n_pos = t.sum()
    precision = tps / (tps + fps)
    recall = tps / n_pos if n_pos else np.full(tps.size, np.nan)
    return precision, recall, thr


def roc_auc(y_true, y_prob) -> float:
    """Area under the ROC curve (MONAI's ``compute_roc_auc``); ``nan`` with a single class."""
    from monai.metrics import compute_roc_auc

    t, p = _as_arrays(y_true, y_prob)
    if t.min() == t.max():
        return float("nan")
    return float(compute_roc_auc(torch.as_tensor(p), torch.as_tensor(t)))


def average_precision(y_true, y_prob) -> float:
    """Area under the precision-recall curve as average precision ``sum_k (R_k - R_{k-1}) P_k``."""
    precision, recall, _ = pr_curve(y_true, y_prob)
    if np.isnan(recall).any():
        return float("nan")
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def sweep_markdown(rows: Sequence[dict[str, float]]) -> str:
    """The sweep as a Markdown table (threshold, TP/FP/TN/FN, sensitivity, specificity, precision, F1)."""
    lines = [
        "| threshold | TP | FP | TN | FN | sensitivity | specificity | precision | F1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['threshold']:.1f} | {r['tp']} | {r['fp']} | {r['tn']} | {r['fn']} | {r['sensitivity']:.3f} | "
            f"{r['specificity']:.3f} | {r['precision']:.3f} | {r['f1']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _save_fig(fig, path: Path) -> None:
    atomic_save_figure(fig, path, dpi=80, bbox_inches="tight")


def save_threshold_report(
    y_true,
    y_prob,
    output_dir: str | os.PathLike,
    thresholds: Sequence[float] = PAPER_THRESHOLDS,
    threshold: float = 0.5,
    title: str = "",
    command: str | None = None,
    cases: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write the full analysis under ``output_dir`` and return the summary.

    Files: ``threshold_sweep.csv``, ``threshold_sweep.md``, ``roc_curve.csv``, ``pr_curve.csv``,
    ``confusion_matrix.csv`` (at ``threshold``), ``summary.json`` (AUCs, metrics at ``threshold``, counts, the
    ``command``), ``scores.csv`` (per case, when ``cases`` is given), and the figures ``roc_curve.png``,
    ``pr_curve.png``, ``confusion_matrix.png``, ``score_histogram.png`` (matplotlib, Agg backend).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, p = _as_arrays(y_true, y_prob)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = threshold_sweep(t, p, thresholds)
    fields = ["threshold", "tp", "fp", "tn", "fn", *SWEEP_METRICS]
    atomic_write_csv(out / "threshold_sweep.csv", [{k: _fmt(r[k]) for k in fields} for r in rows], fields)
    atomic_write_text(out / "threshold_sweep.md", sweep_markdown(rows))
    fpr, tpr, roc_thr = roc_curve(t, p)
    prec, rec, pr_thr = pr_curve(t, p)
    atomic_write_csv(
        out / "roc_curve.csv",
        [{"threshold": _fmt(a), "fpr": _fmt(b), "tpr": _fmt(c)} for a, b, c in zip(roc_thr, fpr, tpr)],
        ["threshold", "fpr", "tpr"],
    )
    atomic_write_csv(
        out / "pr_curve.csv",
        [{"threshold": _fmt(a), "precision": _fmt(b), "recall": _fmt(c)} for a, b, c in zip(pr_thr, prec, rec)],
        ["threshold", "precision", "recall"],
    )
    at = threshold_sweep(t, p, [threshold])[0]
    atomic_write_csv(
        out / "confusion_matrix.csv",
        [
            {"true\\predicted": "COVID (1)", "COVID (1)": at["tp"], "non-COVID (0)": at["fn"]},
            {"true\\predicted": "non-COVID (0)", "COVID (1)": at["fp"], "non-COVID (0)": at["tn"]},
        ],
        ["true\\predicted", "COVID (1)", "non-COVID (0)"],
    )
    if cases is not None:
        if len(cases) != t.size:
            raise ValueError(f"{len(cases)} case names for {t.size} cases")
        atomic_write_csv(
            out / "scores.csv",
            [{"image": c, "label": int(a), "covid_probability": f"{b:.6f}"} for c, a, b in zip(cases, t, p)],
            ["image", "label", "covid_probability"],
        )
    auc, ap = roc_auc(t, p), average_precision(t, p)
    summary: dict[str, Any] = {
        "n": int(t.size),
        "n_positive": int(t.sum()),
        "roc_auc": auc,
        "average_precision": ap,
        "threshold": float(threshold),
        **{k: at[k] for k in ("tp", "fp", "tn", "fn", *SWEEP_METRICS)},
    }
    if command:
        summary["command"] = command
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")

    suffix = f" ({title})" if title else ""
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, lw=2, label=f"AUC = {auc:.3f}")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)")
    ax.set_title("ROC" + suffix, fontsize=9)
    ax.legend(loc="lower right")
    _save_fig(fig, out / "roc_curve.png")

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.step(np.r_[0.0, rec], np.r_[1.0, prec], where="post", lw=2, label=f"AP = {ap:.3f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02))
    ax.set_title("Precision-recall" + suffix, fontsize=9)
    ax.legend(loc="lower left")
    _save_fig(fig, out / "pr_curve.png")

    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    cm = np.array([[at["tp"], at["fn"]], [at["fp"], at["tn"]]])
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks([0, 1], ["COVID", "non-COVID"])
    ax.set_yticks([0, 1], ["COVID", "non-COVID"])
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(f"Confusion matrix, threshold {threshold:g}" + suffix, fontsize=9)
    _save_fig(fig, out / "confusion_matrix.png")

    fig, ax = plt.subplots(figsize=(4.5, 3))
    bins = np.linspace(0, 1, 21)
    ax.hist(p[t == 1], bins=bins, alpha=0.6, label="COVID")
    ax.hist(p[t == 0], bins=bins, alpha=0.6, label="non-COVID")
    ax.set(xlabel="predicted COVID probability", ylabel="images")
    ax.set_title("Predicted scores" + suffix, fontsize=9)
    ax.legend()
    _save_fig(fig, out / "score_histogram.png")
    return summary


def _fmt(v: Any) -> str:
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    v = float(v)
    return "inf" if np.isinf(v) else ("nan" if np.isnan(v) else f"{v:.6f}")


class ThresholdReportHandler:
    """Ignite handler: collects ``(probability, label)`` per iteration and writes :func:`save_threshold_report`.

    Attach to a ``SupervisedEvaluator`` whose postprocessing gives ``pred`` as the positive-class probability
    (``B x 1`` or ``B``) and whose batch has ``label`` 0/1. The report is written when the epoch completes.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        thresholds: Sequence[float] = PAPER_THRESHOLDS,
        threshold: float = 0.5,
        title: str = "",
        command: str | None = None,
        pred_key: str = "pred",
        label_key: str = "label",
        image_key: str = "image",
    ) -> None:
        self.output_dir = output_dir
        self.thresholds = thresholds
        self.threshold = threshold
        self.title = title
        self.command = command
        self.pred_key, self.label_key, self.image_key = pred_key, label_key, image_key
        self.summary: dict[str, Any] = {}
        self._reset()

    def _reset(self, engine: Engine | None = None) -> None:
        self.probs: list[float] = []
        self.labels: list[float] = []
        self.cases: list[str] = []

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def collect(self, engine: Engine) -> None:
        for o in engine.state.output:
            self.probs.append(float(torch.as_tensor(o[self.pred_key]).reshape(-1)[0]))
            self.labels.append(float(torch.as_tensor(o[self.label_key]).reshape(-1)[0]))
        batch = engine.state.batch  # MONAI engines decollate it into a list of per-image dicts
        for d in batch if isinstance(batch, list) else [batch]:
            meta = getattr(d.get(self.image_key), "meta", None) or {}
            names = meta.get("filename_or_obj")
            if names is not None:
                self.cases.extend(Path(n).name for n in ([names] if isinstance(names, str) else names))

    def write(self, engine: Engine | None = None) -> dict[str, Any]:
        cases = self.cases if len(self.cases) == len(self.probs) else None
        self.summary = save_threshold_report(
            self.labels, self.probs, self.output_dir, self.thresholds, self.threshold, self.title, self.command, cases
        )
        return self.summary
