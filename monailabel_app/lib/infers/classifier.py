"""CT volume COVID-19 classification (ResNeXt+, paper 004): a probability for the study and a score per slice.

A class score is not an image, so this task does not run MONAI Label's image post-processing (``Restored`` + the
NIfTI ``Writer``) that ``BundleInferTask`` appends. It returns only JSON, in the shape MONAI Label's
``ClassificationWriter`` gives (``prediction``: one ``{idx, label, score}`` per class) plus the study-level fields
``monai-covid infer`` reports: ``covid_probability``, ``covid_detected`` (at the bundle's ``volume_threshold``) and
the slices whose score reaches the bundle's ``slice_threshold`` (indices along the file's z axis, 0-based).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferType

from .ct import CTCase, CTVolumeTask
from .lesion import ModelCache

__all__ = ["CovidClassification", "CLASS_NAMES"]

CLASS_NAMES = ("non-COVID-19", "COVID-19")


class CovidClassification(CTVolumeTask):
    """COVID-19 vs non-COVID-19 for a whole CT volume (HU), with per-slice scores."""

    def __init__(self, name: str, bundle: Path) -> None:
        super().__init__(
            bundle=bundle,
            type=InferType.CLASSIFICATION,
            labels={c: i for i, c in enumerate(CLASS_NAMES)},
            description=(
                f"COVID-19 CT volume classification (ResNeXt+; bundle {bundle.name}): probability and slice scores "
                "as JSON; research use, not diagnosis"
            ),
        )
        self.name = name
        self.models = ModelCache(name)

    def predict(self, case: CTCase, device: str) -> tuple[None, dict[str, Any]]:
        models = self.models.get(device)
        p, slice_scores = models.detect_covid(case.volume.array, case.lung)
        volume_threshold = float(models.config(self.name, "postprocessing#volume_threshold", 0.5))
        slice_threshold = float(models.config(self.name, "postprocessing#slice_threshold", 0.5))
        scores = np.asarray(slice_scores, dtype=float)
        return None, {
            "prediction": [
                {"idx": 0, "label": CLASS_NAMES[0], "score": round(1.0 - p, 6)},
                {"idx": 1, "label": CLASS_NAMES[1], "score": round(p, 6)},
            ],
            "covid_probability": round(p, 6),
            "covid_detected": bool(p >= volume_threshold),
            "volume_threshold": volume_threshold,
            "slice_threshold": slice_threshold,
            "slice_scores": [round(float(s), 4) for s in scores],
            "positive_slices": [int(i) for i in np.flatnonzero(scores >= slice_threshold)],
        }
