"""Lung mask of a CT: the threshold + morphology method of ``data_prep.lung.lung_mask`` (no network)."""

from __future__ import annotations

from typing import Any

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferType

from .ct import CTCase, CTVolumeTask

__all__ = ["LungMask"]


class LungMask(CTVolumeTask):
    """Both lungs of a CT in HU as label ``lung`` = 1 (threshold at -600 HU, body-border air removed, two largest
    components, holes filled, convex hull per lung, 2 mm dilation; ResNeXt+ paper Sec. IV-B)."""

    def __init__(self) -> None:
        super().__init__(
            bundle=None,
            type=InferType.SEGMENTATION,
            labels={"lung": 1},
            description="Lung mask by HU threshold and morphology (data_prep.lung.lung_mask), not a learned model",
        )

    def predict(self, case: CTCase, device: str) -> tuple[np.ndarray, dict[str, Any]]:
        from data_prep.lung import lung_volume_ml

        return case.lung.astype(np.uint8), {"lung_volume_ml": round(lung_volume_ml(case.lung, case.volume.spacing), 2)}
