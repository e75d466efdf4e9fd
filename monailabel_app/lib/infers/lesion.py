"""CT lesion segmentation (A-SegNet, or the Co-supervision ResUnet when its bundle is installed).

Why not MONAI Label's ``BundleInferTask``: that task runs the bundle's ``preprocessing`` / ``inferer`` /
``postprocessing`` on a dict whose ``image`` is a path and appends ``Restored`` to write an image. Our lesion bundles'
``inference.json`` is a batch job over a folder: ``preprocessing`` turns a datalist item (with ``kind``) into a case,
``LesionInferer`` crops the lungs and resizes every slice to the training size, and ``postprocessing`` writes files
into ``output_dir``. So this task calls the same code directly, through ``monai_covid.batch.ModelSet`` (which loads
the bundle's ``network_def`` and fp16 ``models/model.pt`` with ``load_bundle_network`` and runs ``segment_volume``
on the HU volume with its ``data_prep.lung.lung_mask``): the mask is the one ``monai-covid infer`` writes.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferType

from .ct import CTCase, CTVolumeTask

logger = logging.getLogger(__name__)

__all__ = ["LesionSegmentation", "ModelCache"]


class ModelCache:
    """``monai_covid.batch.ModelSet`` per device for one model name, built on first use."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._sets: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, device: str):
        from monai_covid.batch import ModelSet

        with self._lock:
            if device not in self._sets:
                models = ModelSet([self.name], device=device)
                models.net(self.name)  # load now, under the lock
                self._sets[device] = models
            return self._sets[device]


class LesionSegmentation(CTVolumeTask):
    """COVID-19 lesions (ground-glass opacity and consolidation) of a CT in HU: label ``lesion`` = 1 inside the lungs."""

    def __init__(self, name: str, bundle: Path, paper: str) -> None:
        super().__init__(
            bundle=bundle,
            type=InferType.SEGMENTATION,
            labels={"lesion": 1},
            description=f"COVID-19 lung lesion segmentation ({paper}; bundle {bundle.name}); research use, not diagnosis",
        )
        self.models = ModelCache(name)

    def predict(self, case: CTCase, device: str) -> tuple[np.ndarray, dict[str, Any]]:
        from data_prep.lung import lung_volume_ml

        mask = self.models.get(device).segment_lesions(case.volume.array, case.lung)
        lung_ml = lung_volume_ml(case.lung, case.volume.spacing)
        lesion_ml = lung_volume_ml(mask, case.volume.spacing)
        return mask, {
            "lesion_volume_ml": round(lesion_ml, 2),
            "lung_volume_ml": round(lung_ml, 2),
            "lesion_percent_of_lung": round(100.0 * lesion_ml / lung_ml, 3) if lung_ml > 0 else 0.0,
        }
