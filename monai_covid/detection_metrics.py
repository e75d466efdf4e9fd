"""Binary detection/segmentation metrics with the normal-approximation 95% confidence interval.

Definitions as in Degerli et al., "COVID-19 infection map generation and detection from chest X-ray images", Health
Inf Sci Syst 9, 15 (2021), section "Experimental setup": sensitivity TP/(TP+FN), specificity TN/(TN+FP), precision
TP/(TP+FP), accuracy, F-beta = (1+b^2) P S / (b^2 P + S) with F1 (b=1) and F2 (b=2), and for each metric m over N
samples the interval m +/- z sqrt(m (1-m) / N), z = 1.96. N is the number of samples the metric is a rate over
(positives for sensitivity, negatives for specificity, predicted positives for precision, all samples for accuracy
and the F-scores), so pixels for a pixel-level metric and images for an image-level one.

Inputs are 0/1 (or boolean) arrays of any shape; counts can be accumulated over many images with
:class:`BinaryCounts`. The ignite handler :class:`SegmentationDetectionReport` applies this to a segmentation model
that also detects (pixel-level metrics on positive images, image-level detection by "any pixel >= threshold").
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "BinaryCounts",
    "confidence_radius",
    "binary_counts",
    "binary_metrics",
    "SegmentationDetectionReport",
]

METRICS = ("sensitivity", "specificity", "precision", "accuracy", "f1", "f2")


def confidence_radius(metric: float, n: int, z: float = 1.96) -> float:
    """Half-width ``z * sqrt(m (1 - m) / N)`` of the paper's confidence interval (nan when ``N`` is 0 or m is nan)."""
    if n <= 0 or not math.isfinite(metric):
        return float("nan")
    return z * math.sqrt(max(metric * (1.0 - metric), 0.0) / n)


def _ratio(num: int, den: int) -> float:
    return num / den if den > 0 else float("nan")


def _f_beta(tp: int, fp: int, fn: int, beta: float) -> float:
    """F-beta from counts, equal to (1+b^2) P S / (b^2 P + S) and defined (0) when nothing is predicted."""
    b2 = beta * beta
    den = (1 + b2) * tp + b2 * fn + fp
    return (1 + b2) * tp / den if den > 0 else float("nan")


@dataclass
class BinaryCounts:
    """Confusion-matrix counts of a binary decision; add them up over images with ``+=``."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    def __iadd__(self, other: BinaryCounts) -> BinaryCounts:
        self.tp += other.tp
        self.fp += other.fp
        self.tn += other.tn
        self.fn += other.fn
        return self

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def metrics(self, z: float = 1.96) -> dict[str, Any]:
        """``{metric: value, metric + "_ci": radius, ..., "tp": ..., "n": ...}``, values as fractions in [0, 1]."""
        sen, spe = _ratio(self.tp, self.tp + self.fn), _ratio(self.tn, self.tn + self.fp)
        pre, acc = _ratio(self.tp, self.tp + self.fp), _ratio(self.tp + self.tn, self.n)
        values = {
            "sensitivity": (sen, self.tp + self.fn),
            "specificity": (spe, self.tn + self.fp),
            "precision": (pre, self.tp + self.fp),
            "accuracy": (acc, self.n),
            "f1": (_f_beta(self.tp, self.fp, self.fn, 1.0), self.n),
            "f2": (_f_beta(self.tp, self.fp, self.fn, 2.0), self.n),
        }
        out: dict[str, Any] = {}
        for name, (value, n) in values.items():
            out[name] = value
            out[f"{name}_ci"] = confidence_radius(value, n, z)
        out.update(tp=self.tp, fp=self.fp, tn=self.tn, fn=self.fn, n=self.n)
        return out


def _as_bool(x: np.ndarray | torch.Tensor | Sequence) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    return arr.astype(bool) if arr.dtype == bool else arr > 0.5


def binary_counts(pred: np.ndarray | torch.Tensor | Sequence, target: np.ndarray | torch.Tensor | Sequence) -> BinaryCounts:
    """Counts of 0/1 (or boolean) ``pred`` against ``target``, any equal shapes."""
    p, t = _as_bool(pred), _as_bool(target)
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and target {t.shape} differ in shape")
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    return BinaryCounts(tp=tp, fp=fp, tn=int(p.size - tp - fp - fn), fn=fn)


def binary_metrics(
    pred: np.ndarray | torch.Tensor | Sequence, target: np.ndarray | torch.Tensor | Sequence, z: float = 1.96
) -> dict[str, Any]:
    """Sensitivity, specificity, precision, accuracy, F1, F2 and their CI radii for 0/1 ``pred`` vs ``target``."""
    return binary_counts(pred, target).metrics(z)


class SegmentationDetectionReport:
    """Ignite handler: pixel-level metrics on positive images and image-level detection, written as JSON.

    For each decollated output item: ``pred_key`` a probability map ``(1, H, W)``, ``label_key`` the 0/1 mask of the
    same size, ``positive_key`` the image label (1 = positive class). Pixels ``>= threshold`` are predicted positive;
    an image is detected positive when any pixel is (the paper's rule), or, with ``detector`` (a
    :class:`monai_covid.cxr_detector.CxrDetector` or its JSON path, e.g. the CXR bundle's ``models/detector.json``),
    when that detector calls it COVID-19. Pixel counts are pooled over the positive images (the paper's
    pixel-level evaluation on COVID-19 images), detection counts over all images. Also records the mean time per image
    from iteration start to end (forward pass and post-processing, not file reading).
    """

    def __init__(
        self,
        output_path: str | os.PathLike | None = None,
        pred_key: str = "pred",
        label_key: str = "label",
        positive_key: str = "covid",
        threshold: float = 0.5,
        z: float = 1.96,
        detector: Any = None,
    ) -> None:
        self.output_path = None if output_path is None else Path(output_path)
        self.pred_key, self.label_key, self.positive_key = pred_key, label_key, positive_key
        self.threshold, self.z = threshold, z
        if detector is not None:
            from monai_covid.cxr_detector import CxrDetector

            detector = detector if isinstance(detector, CxrDetector) else CxrDetector.load(detector)
        self.detector = detector
        self._tap = None
        self.reset()

    def reset(self, engine=None) -> None:
        self.pixel = BinaryCounts()
        self.image = BinaryCounts()
        self.n_images = 0
        self.seconds = 0.0
        self._t0 = 0.0
        self.result: dict[str, Any] = {}

    def _attach_tap(self, engine) -> None:
        from monai_covid.cxr_detector import EmbeddingTap

        if self._tap is None:
            self._tap = EmbeddingTap(engine.network, self.detector.embedding_layer).attach()

    def attach(self, engine) -> None:
        from ignite.engine import Events

        if self.detector is not None and self.detector.needs_embedding:  # it reads the encoder too: pool each pass
            # a MONAI evaluator attaches its handlers before it sets ``engine.network``: hook it when the run starts
            engine.add_event_handler(Events.STARTED, self._attach_tap)
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.COMPLETED, self._complete)

    def _start(self, engine) -> None:
        self._t0 = time.perf_counter()

    def update(
        self,
        prob: np.ndarray | torch.Tensor,
        label: np.ndarray | torch.Tensor,
        positive: int | bool,
        embedding: np.ndarray | None = None,
    ) -> None:
        """Add one image (``embedding``: its pooled encoder features, for a detector that reads them)."""
        if isinstance(prob, torch.Tensor):
            prob = prob.detach().cpu().float().numpy()
        pred = np.asarray(prob) >= self.threshold
        positive = bool(int(positive))
        if positive:
            self.pixel += binary_counts(pred, label)
        called = (
            bool(pred.any())
            if self.detector is None
            else bool(self.detector(prob, embedding=embedding)["covid_detected"])
        )
        self.image += binary_counts([called], [positive])
        self.n_images += 1

    def _update(self, engine) -> None:
        self.seconds += time.perf_counter() - self._t0
        outputs, batch = engine.state.output, engine.state.batch
        outputs = outputs if isinstance(outputs, Sequence) else [outputs]
        batch = batch if isinstance(batch, Sequence) else [batch]
        embeddings = self._tap.value if self._tap is not None else None
        for i, (item, data) in enumerate(zip(outputs, batch)):
            # MONAI engines keep only image/label/pred in the output; other keys stay in the (decollated) batch
            positive = item[self.positive_key] if self.positive_key in item else data[self.positive_key]
            if isinstance(positive, torch.Tensor):
                positive = int(positive.reshape(-1)[0].item())
            emb = embeddings[i] if embeddings is not None else None
            self.update(item[self.pred_key], item[self.label_key], positive, emb)

    def compute(self) -> dict[str, Any]:
        self.result = {
            "threshold": self.threshold,
            "detector": "paper" if self.detector is None else self.detector.rule,
            "n_images": self.n_images,
            "pixel_level_on_positive_images": self.pixel.metrics(self.z),
            "image_level_detection": self.image.metrics(self.z),
            "ms_per_image": 1000.0 * self.seconds / max(self.n_images, 1),
        }
        return self.result

    def _complete(self, engine) -> None:
        from monai_covid.io_utils import atomic_write_json

        res = self.compute()
        px, det = res["pixel_level_on_positive_images"], res["image_level_detection"]
        for level, m in (("pixel", px), ("detection", det)):
            print(
                f"{level}: " + ", ".join(f"{k} {100 * m[k]:.2f} ± {100 * m[k + '_ci']:.2f}" for k in METRICS)
                + f" (TP {m['tp']} FP {m['fp']} TN {m['tn']} FN {m['fn']})",
                flush=True,
            )
        print(f"{res['ms_per_image']:.1f} ms per image over {res['n_images']} images", flush=True)
        if self.output_path is not None:
            atomic_write_json(self.output_path, res)
