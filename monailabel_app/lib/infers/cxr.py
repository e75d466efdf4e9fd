"""Chest X-ray infection segmentation and COVID-19 call (paper 003 infection-map U-Net), via ``BundleInferTask``.

Here MONAI Label's ``BundleInferTask`` fits: the bundle's ``preprocessing`` (``LoadXrayd`` -> ``Resized`` to the
training size), ``inferer`` (``SimpleInferer``) and ``postprocessing`` (sigmoid, ``Invertd`` back to the X-ray's
size) are plain MONAI transforms on ``image``. Added around them:

- the network is built and loaded by ``monai_covid.inference.lesion.load_bundle_network`` (``weights_only=True``, the
  fp16 state dict cast to float32, strict keys) instead of MONAI Label's loader;
- ``Invertd`` already restores the input size, so MONAI Label's ``Restored`` is not appended;
- post-processing adds the bundle's COVID-19 detector to the JSON (``detector`` of ``inference.json``, read by
  :func:`monai_covid.cxr_detector.bundle_detector`: the calibrated map classifier when the bundle ships one, else
  the paper's rule, any pixel >= ``threshold``; a detector that also reads the encoder gets its pooled features from
  a forward hook on the network, :class:`monai_covid.cxr_detector.EmbeddingTap`) and thresholds the map into label
  ``infection`` = 1;
- the label is written as a PNG of the X-ray's size (values 0/1), as the input is a 2D PNG/JPEG.

DICOM X-rays are not served here: the core reads their pixels with ``pydicom.pixels`` (pydicom >= 3), and MONAI
Label 0.8.5 needs pydicom < 3.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleInferTask

__all__ = ["CXRInfection", "InfectionCalld"]

_EMPTY_CONF: dict[str, str] = {}


class InfectionCalld:
    """Post-transform: ``data["pred"]`` (probability ``(1, H, W)``) -> uint8 ``(H, W)`` mask, and the COVID-19 call,
    the highest probability and the infected area in ``data["result"]``."""

    def __init__(
        self,
        threshold: float = 0.5,
        key: str = "pred",
        result: str = "result",
        detector: Any = None,
        embedding_key: str = "covid_embedding",
    ) -> None:
        self.threshold = threshold
        self.key = key
        self.result = result
        self.detector = detector
        self.embedding_key = embedding_key

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        from monai_covid.infection_map import covid_detected, covid_probability, infected_area_percent

        d = dict(data)
        prob = torch.as_tensor(d[self.key]).detach().float().cpu().numpy()
        prob = prob[0] if prob.ndim == 3 else prob
        res = dict(d.get(self.result) or {})
        # pooled encoder features of the forward pass, when the detector reads them
        embedding = d.pop(self.embedding_key, None)
        if self.detector is not None:
            call = self.detector(prob, embedding=embedding)
            covid = {
                "covid_probability": round(float(call["covid_probability"]), 6),
                "covid_detected": bool(call["covid_detected"]),
                "covid_detector": self.detector.rule,
                "covid_threshold": round(float(self.detector.threshold), 6),
            }
        else:
            covid = {
                "covid_probability": round(covid_probability(prob), 6),
                "covid_detected": bool(covid_detected(prob, self.threshold)),
                "covid_detector": "paper",
                "covid_threshold": self.threshold,
            }
        res.update(
            {
                **covid,
                "infected_area_percent": round(infected_area_percent(prob, self.threshold), 3),
                "threshold": self.threshold,
            }
        )
        d[self.result] = res
        d[self.key] = (prob >= self.threshold).astype(np.uint8)
        return d


class CXRInfection(BundleInferTask):
    """COVID-19 infection of a 2D chest X-ray (PNG/JPEG): label ``infection`` = 1, and the detection call as JSON."""

    def __init__(self, name: str, bundle: Path) -> None:
        self.name = name
        self._nets: dict[str, torch.nn.Module] = {}
        self._taps: dict[str, Any] = {}
        self._net_lock = threading.Lock()
        super().__init__(str(bundle), _EMPTY_CONF, type=InferType.SEGMENTATION, add_post_restore=False, load_strict=True)
        if not self.valid:
            return
        self.labels = {"infection": 1}
        self.dimension = 2
        self.description = (
            f"COVID-19 infection map of a chest X-ray (paper 003 U-Net; bundle {bundle.name}), PNG/JPEG; "
            "research use, not diagnosis"
        )
        self.threshold = float(self.bundle_config.config.get("threshold", 0.5))
        from monai_covid.cxr_detector import bundle_detector

        self.detector = bundle_detector(bundle, self.bundle_config.config)

    def _get_network(self, device: str, data: Any) -> torch.nn.Module:
        from monai_covid.inference.lesion import load_bundle_network

        with self._net_lock:
            if device not in self._nets:
                net = load_bundle_network(self.bundle_path, device)
                if self.detector.needs_embedding:
                    from monai_covid.cxr_detector import EmbeddingTap

                    self._taps[device] = EmbeddingTap(net, self.detector.embedding_layer).attach()
                self._nets[device] = net
            return self._nets[device]

    def run_inferer(self, data: dict[str, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        """MONAI Label's forward pass; the detector's pooled encoder features of it (values are per thread) go to
        ``data["covid_embedding"]`` for :class:`InfectionCalld`."""
        for tap in self._taps.values():
            tap.clear()
        data = super().run_inferer(data, *args, **kwargs)
        embedding = next((t.value for t in self._taps.values() if t.value is not None), None)
        if embedding is not None:
            data["covid_embedding"] = embedding[0]
        return data

    def post_transforms(self, data: dict[str, Any] | None = None) -> Sequence[Callable]:
        return [*super().post_transforms(data), InfectionCalld(self.threshold, key=self.key_pred, detector=self.detector)]

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: Any = None) -> tuple[Any, Any]:
        from PIL import Image

        mask = np.asarray(data[self.key_pred], dtype=np.uint8)
        fd, name = tempfile.mkstemp(suffix=".png", prefix="monai_covid_cxr_")
        os.close(fd)
        Image.fromarray(mask).save(name)
        return name, dict(data.get(self.output_json_key) or {})
