"""Infection maps and COVID-19 detection from an infection-probability map (chest X-ray).

Degerli et al., "COVID-19 infection map generation and detection from chest X-ray images", Health Inf Sci Syst 9,
15 (2021), section "Infection map generation and COVID-19 detection":

- the probability map ``Y`` (values in [0, 1]) is coloured with the jet colour scale; the infection map takes hue and
  saturation from that colour and the value (brightness) from the X-ray, converted back to RGB; pixels with zero
  probability are not shown (alpha 0 here, so the map can be laid over the X-ray);
- a CXR is classified COVID-19 when ``Y >= 0.5`` at any pixel.

Also here: reading 2D X-rays (PNG/JPEG, DICOM CR/DX) into [0, 1] arrays, the MONAI transforms around that, and the
ignite handler that writes the per-image outputs of the infection-map bundle.

Shapes: images and probability maps are ``(H, W)`` arrays or ``(1, H, W)`` channel-first tensors; infection maps are
``(H, W, 4)`` uint8 RGBA.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

__all__ = [
    "XRAY_SUFFIXES",
    "read_xray",
    "read_mask",
    "xray_datalist",
    "LoadXray",
    "LoadXrayd",
    "jet_rgb",
    "infection_map",
    "InfectionMap",
    "InfectionMapd",
    "covid_probability",
    "covid_detected",
    "infected_area_percent",
    "InfectionMapWriter",
]

XRAY_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
_DICOM_SUFFIXES = (".dcm", ".dicom")
#: DICOM modalities accepted as 2D chest X-rays (computed and digital radiography).
XRAY_MODALITIES = ("CR", "DX")


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _read_dicom_xray(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    modality = str(getattr(ds, "Modality", "")).upper()
    if modality not in XRAY_MODALITIES:
        raise ValueError(f"not a 2D X-ray (DICOM Modality {modality or 'missing'}; expected CR or DX)")
    arr = ds.pixel_array
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        raise ValueError(f"multi-frame DICOM ({ds.NumberOfFrames} frames); expected one 2D image")
    if int(getattr(ds, "SamplesPerPixel", 1)) == 3:
        arr = arr.astype(np.float32).mean(axis=-1)
    else:
        arr = apply_voi_lut(apply_modality_lut(arr, ds), ds)
    arr = np.asarray(arr, dtype=np.float32)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        arr = arr.max() - arr  # MONOCHROME1: high values are dark
    return arr


def read_xray(path: str | os.PathLike) -> np.ndarray:
    """A 2D X-ray as a float32 ``(H, W)`` array in [0, 1], rows top to bottom.

    8-bit PNG/JPEG (grey or colour, converted to grey) are divided by 255, as in training; 16-bit images and DICOM CR/DX
    (modality LUT, VOI LUT/window, MONOCHROME1 inverted) are scaled by their own minimum and maximum.
    Raises ``ValueError`` naming the problem for anything that is not a readable single 2D X-ray.
    """
    path = Path(path)
    if _is_dicom(path):
        arr = _read_dicom_xray(path)
        scale_by_range = True
    else:
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                arr = np.asarray(im, dtype=np.float32)
                scale_by_range = True
            else:
                arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
                scale_by_range = False
    if arr.ndim != 2 or min(arr.shape) < 8:
        raise ValueError(f"expected one 2D image, got an array of shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("image has non-finite pixel values")
    if scale_by_range:
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return np.ascontiguousarray(arr, dtype=np.float32)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A binary mask PNG (0 / 255) as a float32 ``(H, W)`` array of 0 and 1."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("L"))
    return (arr > 127).astype(np.float32)


def xray_datalist(
    dataset_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None, validate: bool = True
) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` for the 2D X-rays in ``dataset_dir`` (png/jpg/jpeg/dcm, or DICOM without suffix).

    With ``validate`` each file is read once; a file that cannot be read as one 2D X-ray is reported on stderr in one
    line naming it and left out, so that one bad file does not stop a batch. Refuses an ``output_dir`` inside
    ``dataset_dir`` (outputs never go into the input folder).
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: input folder not found")
    if output_dir is not None:
        out = Path(output_dir).resolve()
        if out == root.resolve() or root.resolve() in out.parents:
            raise ValueError(f"{output_dir}: output folder must not be inside the input folder {root}")
    items = []
    for p in sorted(root.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.suffix.lower() not in XRAY_SUFFIXES and (p.suffix or not _is_dicom(p)):
            continue
        if validate:
            try:
                read_xray(p)
            except Exception as e:  # any decoder error: report the file and go on
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                print(f"error: {p}: {msg}", file=sys.stderr, flush=True)
                continue
        items.append({"image": str(p)})
    return items


class LoadXray(Transform):
    """Path -> ``MetaTensor`` ``(1, H, W)`` float32: an X-ray in [0, 1] (:func:`read_xray`) or a 0/1 mask."""

    def __init__(self, mask: bool = False) -> None:
        self.mask = mask

    def __call__(self, path: str | os.PathLike) -> MetaTensor:
        arr = read_mask(path) if self.mask else read_xray(path)
        meta = {"filename_or_obj": str(path), "spatial_shape": np.array(arr.shape), "original_channel_dim": "no_channel"}
        return MetaTensor(torch.from_numpy(arr)[None], affine=torch.eye(3, dtype=torch.float64), meta=meta)


class LoadXrayd(MapTransform):
    """Dictionary version of :class:`LoadXray`."""

    def __init__(self, keys: KeysCollection, mask: bool = False, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadXray(mask=mask)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d


def _as_2d(x: np.ndarray | torch.Tensor) -> np.ndarray:
    arr = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"expected an (H, W) or (1, H, W) array, got shape {arr.shape}")
    return arr


def jet_rgb(prob: np.ndarray) -> np.ndarray:
    """The jet colour (matplotlib's 256-entry table) of each probability: ``(...)`` -> ``(..., 3)`` float in [0, 1]."""
    from matplotlib import colormaps

    return np.asarray(colormaps["jet"](np.clip(prob, 0.0, 1.0))[..., :3], dtype=np.float32)


def infection_map(
    prob: np.ndarray | torch.Tensor, image: np.ndarray | torch.Tensor, zero_below: float = 0.01
) -> np.ndarray:
    """The paper's infection map as RGBA uint8 ``(H, W, 4)``.

    Hue and saturation come from ``jet(prob)``, value from ``image`` (both ``(H, W)`` or ``(1, H, W)`` in [0, 1]).
    Pixels with ``prob < zero_below`` count as zero probability (a sigmoid never gives exactly 0): alpha 0, RGB the
    grey X-ray; every other pixel is opaque.
    """
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    p, v = _as_2d(prob), np.clip(_as_2d(image), 0.0, 1.0)
    if p.shape != v.shape:
        raise ValueError(f"probability map {p.shape} and image {v.shape} differ in size")
    hsv = rgb_to_hsv(jet_rgb(p))
    hsv[..., 2] = v
    rgb = hsv_to_rgb(hsv)
    shown = p >= zero_below
    rgb[~shown] = v[~shown, None]
    out = np.empty(p.shape + (4,), dtype=np.uint8)
    out[..., :3] = np.round(rgb * 255.0).astype(np.uint8)
    out[..., 3] = np.where(shown, 255, 0).astype(np.uint8)
    return out


class InfectionMap(Transform):
    """Array transform: ``(prob, image)`` -> RGBA infection map ``(H, W, 4)`` uint8 (see :func:`infection_map`)."""

    def __init__(self, zero_below: float = 0.01) -> None:
        self.zero_below = zero_below

    def __call__(self, prob: np.ndarray | torch.Tensor, image: np.ndarray | torch.Tensor) -> np.ndarray:
        return infection_map(prob, image, self.zero_below)


class InfectionMapd(MapTransform):
    """Dictionary version of :class:`InfectionMap`: ``d[map_key] = infection_map(d[key], d[image_key])``."""

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        map_key: str = "infection_map",
        zero_below: float = 0.01,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key, self.map_key = image_key, map_key
        self.mapper = InfectionMap(zero_below)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.map_key] = self.mapper(d[key], d[self.image_key])
        return d


def covid_probability(prob: np.ndarray | torch.Tensor) -> float:
    """The highest pixel probability of the map."""
    return float(_as_2d(prob).max())


def covid_detected(prob: np.ndarray | torch.Tensor, threshold: float = 0.5) -> bool:
    """The paper's detection rule: COVID-19 when any pixel has probability ``>= threshold``."""
    return covid_probability(prob) >= threshold


def infected_area_percent(prob: np.ndarray | torch.Tensor, threshold: float = 0.5) -> float:
    """Percentage of the image's pixels with probability ``>= threshold``."""
    return float(100.0 * (_as_2d(prob) >= threshold).mean())


class InfectionMapWriter:
    """Ignite handler: per image ``<stem>_seg.png`` (0/255), ``<stem>_map.png`` (RGBA) and one ``predictions.csv``.

    Reads the decollated engine output: ``pred_key`` the probability map and ``image_key`` the X-ray in [0, 1], both
    ``(1, H, W)`` at the input's size; the file name from ``pred_key``'s or ``image_key``'s meta data. The CSV
    (``image,covid_probability,covid_detected,infected_area_percent``) is written when the run completes.

    ``detector``: ``None`` (default) applies the paper's rule (``covid_probability`` = max p, detected when it is
    ``>= threshold``); a :class:`monai_covid.cxr_detector.CxrDetector` or the path of its JSON file gives the
    calibrated ``covid_probability`` and its own threshold (issue 19; fitted on out-of-fold training maps). A detector
    that also reads the network's pooled encoder features (``needs_embedding``) gets them from a forward hook that
    :meth:`attach` puts on ``engine.network`` (:class:`monai_covid.cxr_detector.EmbeddingTap`).
    """

    CSV_COLUMNS = ("image", "covid_probability", "covid_detected", "infected_area_percent")

    def __init__(
        self,
        output_dir: str | os.PathLike,
        pred_key: str = "pred",
        image_key: str = "xray",
        threshold: float = 0.5,
        zero_below: float = 0.01,
        csv_name: str = "predictions.csv",
        detector: Any = None,
    ) -> None:
        from monai_covid.cxr_detector import CxrDetector

        if detector is not None and not isinstance(detector, CxrDetector):
            detector = CxrDetector.load(detector)
        self.detector = detector
        if self.detector is not None and self.detector.use_lung:
            raise ValueError("the infection-map bundle predicts no lung mask: use a detector fitted without one")
        self.output_dir = Path(output_dir)
        self.pred_key, self.image_key = pred_key, image_key
        self.threshold, self.zero_below, self.csv_name = threshold, zero_below, csv_name
        self.rows: list[dict[str, Any]] = []
        self._stems: set[str] = set()
        self._tap = None

    def _attach_tap(self, engine) -> None:
        from monai_covid.cxr_detector import EmbeddingTap

        if self._tap is None:
            self._tap = EmbeddingTap(engine.network, self.detector.embedding_layer).attach()

    def attach(self, engine) -> None:
        from ignite.engine import Events

        if self.detector is not None and self.detector.needs_embedding:  # it reads the encoder too: pool each pass
            # a MONAI evaluator attaches its handlers before it sets ``engine.network``: hook it when the run starts
            engine.add_event_handler(Events.STARTED, self._attach_tap)

        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._write_items)
        engine.add_event_handler(Events.COMPLETED, self._write_csv)

    def _reset(self, engine=None) -> None:
        self.rows, self._stems = [], set()

    def _stem(self, path: Path) -> str:
        stem = path.stem if path.suffix.lower() in XRAY_SUFFIXES else path.name
        if stem in self._stems:  # a.png and a.dcm in one folder
            stem = f"{stem}_{path.suffix.lstrip('.').lower() or 'dicom'}"
        self._stems.add(stem)
        return stem

    def write_one(
        self,
        prob: np.ndarray | torch.Tensor,
        image: np.ndarray | torch.Tensor,
        source: str,
        embedding: np.ndarray | None = None,
    ) -> dict:
        """Write the two PNGs of one X-ray and return its CSV row (``embedding``: its pooled encoder features, for a
        detector that reads them)."""
        from monai_covid.io_utils import atomic_save_png

        p = _as_2d(prob)
        stem = self._stem(Path(source))
        atomic_save_png(self.output_dir / f"{stem}_seg.png", np.where(p >= self.threshold, 255, 0).astype(np.uint8))
        atomic_save_png(self.output_dir / f"{stem}_map.png", infection_map(p, image, self.zero_below))
        if self.detector is None:
            prob_covid, detected = covid_probability(p), covid_detected(p, self.threshold)
        else:
            res = self.detector(p, embedding=embedding)
            prob_covid, detected = res["covid_probability"], res["covid_detected"]
        row = {
            "image": Path(source).name,
            "covid_probability": f"{prob_covid:.4f}",
            "covid_detected": int(detected),
            "infected_area_percent": f"{infected_area_percent(p, self.threshold):.2f}",
        }
        self.rows.append(row)
        return row

    def _write_items(self, engine) -> None:
        outputs, batch = engine.state.output, engine.state.batch
        outputs = outputs if isinstance(outputs, Sequence) else [outputs]
        batch = batch if isinstance(batch, Sequence) else [batch]
        embeddings = self._tap.value if self._tap is not None else None  # (B, C) of this iteration's forward
        for i, (item, data) in enumerate(zip(outputs, batch)):
            # MONAI engines keep only image/label/pred in the output; other keys stay in the (decollated) batch
            pred = item[self.pred_key] if self.pred_key in item else data[self.pred_key]
            image = item[self.image_key] if self.image_key in item else data[self.image_key]
            meta = getattr(image, "meta", None) or getattr(pred, "meta", {})
            emb = embeddings[i] if embeddings is not None else None
            self.write_one(pred, image, str(meta.get("filename_or_obj", f"image{len(self.rows)}")), emb)

    def _write_csv(self, engine=None) -> None:
        from monai_covid.io_utils import atomic_write_csv

        atomic_write_csv(self.output_dir / self.csv_name, self.rows, self.CSV_COLUMNS)
        n_pos = sum(int(r["covid_detected"]) for r in self.rows)
        print(f"{len(self.rows)} X-rays -> {self.output_dir}: {n_pos} detected as COVID-19", flush=True)


def predict_cxr(
    net: torch.nn.Module,
    image: np.ndarray,
    device: str | torch.device = "cpu",
    image_size: tuple[int, int] = (256, 256),
    threshold: float = 0.5,
    zero_below: float = 0.01,
    detector: Any = None,
) -> dict[str, Any]:
    """One X-ray ``(H, W)`` in [0, 1] through the infection U-Net, as ``inference.json`` does it.

    Resized to ``image_size`` (bilinear, anti-aliased), sigmoid, probability resized back to ``(H, W)``. Returns
    ``prob`` (float32 ``(H, W)``), ``seg`` (uint8 0/255), ``map`` (RGBA uint8, :func:`infection_map`),
    ``covid_probability``, ``covid_detected`` and ``infected_area_percent``; ``detector`` (a
    :class:`monai_covid.cxr_detector.CxrDetector` or its JSON path) replaces the paper's rule for the two COVID keys
    (a detector that reads the encoder gets its pooled features from the same forward pass).
    """
    import torch.nn.functional as F
    from monai.transforms import Resize

    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"predict_cxr expects one (H, W) image, got shape {img.shape}")
    x = Resize(spatial_size=tuple(image_size), mode="bilinear", anti_aliasing=True)(torch.from_numpy(img)[None])
    x = torch.as_tensor(x).float()[None].to(device)
    det = None
    if detector is not None:
        from monai_covid.cxr_detector import CxrDetector

        det = detector if isinstance(detector, CxrDetector) else CxrDetector.load(detector)
    embedding = None
    with torch.no_grad():
        if det is not None and det.needs_embedding:  # the detector also reads the encoder: pool it in this pass
            from monai_covid.cxr_detector import EmbeddingTap

            with EmbeddingTap(net, det.embedding_layer) as tap:
                p = torch.sigmoid(net(x).float())
            embedding = tap.value[0]
        else:
            p = torch.sigmoid(net(x).float())
    prob = F.interpolate(p, size=img.shape, mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
    if det is not None:
        res = det(prob, embedding=embedding)
        covid = {"covid_probability": res["covid_probability"], "covid_detected": res["covid_detected"]}
    else:
        covid = {"covid_probability": covid_probability(prob), "covid_detected": covid_detected(prob, threshold)}
    return {
        "prob": prob,
        "seg": np.where(prob >= threshold, 255, 0).astype(np.uint8),
        "map": infection_map(prob, img, zero_below),
        **covid,
        "infected_area_percent": infected_area_percent(prob, threshold),
    }
