"""What the CT infer tasks share: reading a CT once, its lung mask once, and writing a label in its geometry.

MONAI Label hands a task the path of the image (a NIfTI from the studies folder, or an upload). The tasks read it
with ``data_prep.io.read_volume`` (HU, ``(z, y, x)``, the geometry SimpleITK reads) and compute the lung mask with
``data_prep.lung.lung_mask``, exactly as ``monai-covid infer`` does, so the server and the batch job give the same
masks. The last few cases are kept in memory: a viewer that asks for the lesions, the lungs and the COVID score of one
study decodes it and segments its lungs once.

Labels are written with ``data_prep.io.write_like`` (uint8, the exact geometry of the input) rather than MONAI
Label's ``Restored`` + ``Writer``, which rebuild the geometry from an affine.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

logger = logging.getLogger(__name__)

__all__ = ["CTCase", "load_ct_case", "LoadCTd", "CTVolumeTask", "write_label"]

#: how many decoded studies (HU volume + lung mask) stay in memory
CACHE_SIZE = 2


class CTCase:
    """A decoded CT: ``volume`` (``data_prep.io.Volume``, HU) and its ``lung`` mask (bool ``(z, y, x)``)."""

    def __init__(self, volume: Any, lung: np.ndarray) -> None:
        self.volume = volume
        self.lung = lung


_cache: OrderedDict[tuple[str, int, int], CTCase] = OrderedDict()
_cache_lock = threading.Lock()


def load_ct_case(path: str | os.PathLike) -> CTCase:
    """Read a CT (NIfTI file or DICOM series folder) and compute its lung mask; cached by path, size and mtime."""
    from data_prep.io import read_volume
    from data_prep.lung import lung_mask

    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        volume = read_volume(p)
        if volume.array.ndim != 3 or volume.array.shape[0] < 2:
            raise ValueError(f"{p}: expected a 3D CT volume, got shape {volume.array.shape}")
        case = CTCase(volume, lung_mask(volume.array, volume.spacing))
        _cache[key] = case
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
        return case


class LoadCTd:
    """Pre-transform: ``data[key]`` (a path) -> ``data["ct"]`` (:class:`CTCase`); ``data[key]`` stays the path."""

    def __init__(self, keys: str = "image") -> None:
        self.key = keys

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        d["ct"] = load_ct_case(d[self.key])
        return d


def write_label(mask: np.ndarray, case: CTCase) -> str:
    """``mask`` ``(z, y, x)`` as a uint8 NIfTI in the geometry of ``case``; returns the path of a temporary file
    (the server deletes it once it has been sent)."""
    from data_prep.io import write_like

    fd, name = tempfile.mkstemp(suffix=".nii.gz", prefix="monai_covid_")
    os.close(fd)
    write_like(np.asarray(mask, dtype=np.uint8), case.volume, name)
    return name


class CTVolumeTask(BasicInferTask):
    """Base of the CT tasks: pre-transform :class:`LoadCTd`, a model call on ``(HU, lung)``, a label or a score out.

    Subclasses implement :meth:`predict` (``CTCase``, device) -> ``(mask or None, result dict)``. A task with a bundle
    is listed by ``/info`` only when ``models/model.pt`` and ``configs/inference.json`` are there.
    """

    def __init__(
        self,
        bundle: Path | None,
        type: str | InferType,
        labels: dict[str, int],
        description: str,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.bundle = Path(bundle) if bundle is not None else None
        path = str(self.bundle / "models" / "model.pt") if self.bundle is not None else None
        super().__init__(
            path=path, network=None, type=type, labels=labels, dimension=3, description=description, config=config
        )

    def is_valid(self) -> bool:
        if self.bundle is None:
            return True
        return (self.bundle / "models" / "model.pt").is_file() and (self.bundle / "configs" / "inference.json").is_file()

    def pre_transforms(self, data: dict[str, Any] | None = None) -> Sequence[Callable]:
        return [LoadCTd(keys=self.input_key)]

    def post_transforms(self, data: dict[str, Any] | None = None) -> Sequence[Callable]:
        return []

    def predict(self, case: CTCase, device: str) -> tuple[np.ndarray | None, dict[str, Any]]:
        raise NotImplementedError

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cpu") -> dict[str, Any]:
        mask, result = self.predict(data["ct"], device)
        data[self.output_label_key] = mask
        data[self.output_json_key] = result
        return data

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: Any = None) -> tuple[Any, Any]:
        mask = data.get(self.output_label_key)
        result = dict(data.get(self.output_json_key) or {})
        if mask is None:
            return None, result
        return write_label(mask, data["ct"]), result
