"""Explanation heatmaps for image classifiers: Grad-CAM, Grad-CAM++ and occlusion sensitivity, overlaid on the image.

COVID CT-Net (arXiv:2009.05096) Sec. IV-F visualises the third attention block with Grad-CAM and Grad-CAM++, and
Sec. IV-G slides a zeroed N x N patch over the image to find the regions whose occlusion lowers the COVID score.
Here these are MONAI's :class:`monai.visualize.GradCAM`, :class:`~monai.visualize.GradCAMpp` and
:class:`~monai.visualize.OcclusionSensitivity`.

- :func:`readable_images` builds an inference datalist from a folder, reporting unreadable files in one line each.
- :func:`explain_batch` computes heatmaps in ``[0, 1]`` at the network's input size.
- :func:`unletterbox` maps a heatmap from the network input (resized by the longest side, padded to a square)
  back to the original image size.
- :func:`overlay_heatmap` blends a heatmap (matplotlib colormap) onto a grayscale image.
- :class:`SliceClassifier` runs a classifier bundle (``configs/inference.json``: its preprocessing, calibration,
  threshold and explanation layer) on one image file and returns the probability and the overlays; the
  ``monai-covid infer --modality ct`` batch job uses it for CT-Net.
- :class:`ExplanationWriter` is an ignite handler for a ``SupervisedEvaluator``: per image it writes the heatmap
  PNGs ``<stem>_gradcam.png``, ``<stem>_gradcampp.png`` (optional ``<stem>_occlusion.png``) at the image's own size,
  and at the end ``predictions.csv`` (``image,covid_probability,label``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.data import decollate_batch

from monai_covid.io_utils import atomic_save_png, atomic_write_csv

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = [
    "IMAGE_EXTENSIONS",
    "readable_images",
    "read_gray",
    "minmax_normalize",
    "explain_batch",
    "unletterbox",
    "crop_box",
    "overlay_heatmap",
    "ExplanationWriter",
    "SliceClassifier",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
METHODS = ("gradcam", "gradcampp", "occlusion")


def read_gray(path: str | os.PathLike) -> np.ndarray:
    """Read a 2D image file as a uint8 ``(H, W)`` array; colour images give their first channel."""
    from PIL import Image

    with Image.open(path) as img:
        if img.mode in ("RGB", "RGBA", "L", "LA"):
            arr = np.asarray(img)
            arr = arr if arr.ndim == 2 else arr[..., 0]
        else:  # palette, 16-bit, float: let PIL map them to 8-bit luminance
            arr = np.asarray(img.convert("L"))
    return np.ascontiguousarray(arr, dtype=np.uint8)


def readable_images(
    dataset_dir: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS, min_size: int = 8
) -> list[dict[str, str]]:
    """Datalist ``[{"image": path}, ...]`` of the readable 2D images under ``dataset_dir`` (recursive, sorted).

    A file that cannot be decoded, or is smaller than ``min_size`` pixels on a side, is left out with a one-line
    error on stderr naming it; the others are still processed.
    """
    root = Path(dataset_dir)
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
    else:
        raise FileNotFoundError(f"{root}: input folder not found")
    items = []
    for p in files:
        try:
            arr = read_gray(p)
            if min(arr.shape) < min_size:
                raise ValueError(f"image is {arr.shape[1]}x{arr.shape[0]} pixels, smaller than {min_size}")
        except Exception as e:  # any decoding problem: skip this file, keep going
            print(f"error: {p}: cannot read image ({type(e).__name__}: {e}); skipped", file=sys.stderr)
            continue
        items.append({"image": str(p)})
    if not items:
        raise FileNotFoundError(f"{root}: no readable images ({', '.join(extensions)})")
    return items


def minmax_normalize(x: torch.Tensor) -> torch.Tensor:
    """Scale each sample of ``x`` (``B x ...``) to ``[0, 1]``; a constant sample becomes all zeros."""
    flat = x.reshape(x.shape[0], -1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp_min(1e-12), torch.zeros_like(flat))
    return out.reshape(x.shape)


def explain_batch(
    network: nn.Module,
    images: torch.Tensor,
    target_layer: str = "attention3",
    methods: Sequence[str] = ("gradcam", "gradcampp"),
    class_idx: int = 0,
    occlusion_mask_size: int = 16,
    occlusion_overlap: float = 0.5,
    occlusion_value: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Heatmaps ``{method: B x 1 x H x W}`` in ``[0, 1]`` for ``images`` (``B x C x H x W``, network input).

    ``gradcam`` / ``gradcampp`` use the activations of ``target_layer`` (a module name of ``network``) and the
    gradient of logit ``class_idx``; ``occlusion`` replaces a sliding ``occlusion_mask_size`` square with
    ``occlusion_value`` (the paper zeroes the patch) and maps the drop of the class probability (clipped at 0).
    """
    from monai.visualize import GradCAM, GradCAMpp, OcclusionSensitivity

    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown explanation method(s) {sorted(unknown)}; choose from {METHODS}")
    images = images.as_tensor() if hasattr(images, "as_tensor") else images
    images = images.detach().float()
    out: dict[str, torch.Tensor] = {}
    cams = {"gradcam": GradCAM, "gradcampp": GradCAMpp}
    for name in methods:
        if name in cams:
            cam = cams[name](nn_module=network, target_layers=target_layer, postprocessing=minmax_normalize)
            with torch.enable_grad():
                # one image at a time: MONAI's GradCAMpp broadcasts the class score wrongly for batches > 1
                out[name] = torch.cat([cam(x=x[None], class_idx=class_idx).detach() for x in images], 0)
            network.zero_grad(set_to_none=True)
    if "occlusion" in methods:
        occ = OcclusionSensitivity(
            nn_module=network,
            mask_size=occlusion_mask_size,
            n_batch=32,
            verbose=False,
            mode=float(occlusion_value),
            overlap=occlusion_overlap,
            activate=True,
        )
        was_training = network.training
        network.eval()
        maps = []
        with torch.no_grad():
            for x in images:
                base = torch.sigmoid(network(x[None]))[0, class_idx]
                occ_map, _ = occ(x=x[None])
                if occ_map.ndim == x.ndim + 2:  # a trailing class axis (B x 1 x H x W x N) when N > 1
                    occ_map = occ_map[..., class_idx]
                drop = (base - occ_map).clamp_min(0)  # 1 x 1 x H x W
                maps.append(drop.as_tensor() if hasattr(drop, "as_tensor") else drop)
        network.train(was_training)
        out["occlusion"] = minmax_normalize(torch.cat(maps, 0))
    return out


def unletterbox(
    heatmap: np.ndarray | torch.Tensor, original_hw: Sequence[int], box: Sequence[int] | None = None
) -> np.ndarray:
    """Map an ``(S, S)`` heatmap on the network input back to the original ``(H, W)`` image.

    The input was made by resizing the longest side to ``S`` (``monai.transforms.Resize(size_mode="longest")``)
    and padding symmetrically to ``S x S`` (``SpatialPad``); this crops the padding and resizes bilinearly.
    ``box``: ``(y0, y1, x0, x1)`` when the image was first cropped to that box (``data_prep.slice_crop.LungCrop``):
    the heatmap is mapped onto the box and is 0 outside it.
    """
    hm = torch.as_tensor(np.asarray(heatmap, dtype=np.float32) if not torch.is_tensor(heatmap) else heatmap)
    hm = hm.float().squeeze()
    if hm.ndim != 2 or hm.shape[0] != hm.shape[1]:
        raise ValueError(f"expected a square 2D heatmap, got shape {tuple(hm.shape)}")
    size = hm.shape[0]
    full_h, full_w = int(original_hw[0]), int(original_hw[1])
    y0, y1, x0, x1 = (0, full_h, 0, full_w) if box is None else (int(v) for v in box[:4])
    h, w = y1 - y0, x1 - x0
    scale = size / max(h, w)
    rh, rw = int(round(h * scale)), int(round(w * scale))  # as monai.transforms.Resize computes it
    top, left = (size - rh) // 2, (size - rw) // 2  # as SpatialPad(method="symmetric")
    crop = hm[top : top + rh, left : left + rw]
    part = F.interpolate(crop[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    full = torch.zeros((full_h, full_w), dtype=part.dtype)
    full[y0:y1, x0:x1] = part
    return full.clamp(0, 1).cpu().numpy()


def crop_box(image: Any) -> list[int] | None:
    """The ``(y0, y1, x0, x1)`` crop box a preprocessed image carries (``data_prep.slice_crop.BOX_KEY``), or None."""
    from data_prep.slice_crop import BOX_KEY

    box = getattr(image, "meta", {}).get(BOX_KEY)
    return None if box is None else [int(v) for v in torch.as_tensor(box).reshape(-1)[:4]]


def overlay_heatmap(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """Blend ``heatmap`` (``(H, W)`` in ``[0, 1]``) onto a grayscale ``image`` (``(H, W)``); uint8 ``(H, W, 3)``."""
    from matplotlib import colormaps

    image = np.asarray(image)
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if image.shape != heatmap.shape:
        raise ValueError(f"image {image.shape} and heatmap {heatmap.shape} differ in shape")
    gray = image.astype(np.float32)
    if image.dtype == np.uint8 or gray.max() > 1.0:
        gray = gray / 255.0
    rgb = np.repeat(np.clip(gray, 0, 1)[..., None], 3, axis=-1)
    colour = colormaps[cmap](np.clip(heatmap, 0, 1))[..., :3]
    blended = (1.0 - alpha) * rgb + alpha * colour
    return np.clip(np.round(blended * 255.0), 0, 255).astype(np.uint8)


def _filename(image: Any) -> str:
    meta = getattr(image, "meta", None) or {}
    name = meta.get("filename_or_obj")
    if name is None:
        raise KeyError("the image carries no 'filename_or_obj' metadata (load it with LoadImaged)")
    return str(name)


def _as_bool(value: bool | str) -> bool:
    if isinstance(value, str):  # command-line overrides may arrive as text
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class ExplanationWriter:
    """Ignite handler: per image, writes heatmap overlays and one ``predictions.csv`` row.

    Attach to a ``SupervisedEvaluator`` whose postprocessing turns ``pred`` into the class probability
    (e.g. ``Activationsd(keys="pred", sigmoid=True)``). For each image (``filename_or_obj`` metadata) it writes
    ``output_dir/<stem>_<method>.png``: the heatmap resized to the original image and overlaid on it. After the
    run it writes ``output_dir/predictions.csv`` with ``image`` (path), ``covid_probability`` and ``label``
    (the predicted class at ``threshold``: 1 COVID, 0 non-COVID).

    Args:
        output_dir: where outputs go (created; never the input folder).
        methods: any of ``"gradcam"``, ``"gradcampp"``, ``"occlusion"``.
        target_layer: module name of the network for Grad-CAM(++) (COVID CT-Net: ``"attention3"``).
        threshold: probability cut-off for ``label``.
        occlusion: add ``"occlusion"`` to ``methods`` (the bundle's ``explain_occlusion`` switch).
        class_idx: the output channel to explain (1-logit binary network: 0).
        image_key, pred_key: keys in the batch / decollated output.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        methods: Sequence[str] = ("gradcam", "gradcampp"),
        target_layer: str = "attention3",
        threshold: float = 0.5,
        occlusion: bool = False,
        class_idx: int = 0,
        image_key: str = "image",
        pred_key: str = "pred",
        occlusion_mask_size: int = 16,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.methods = list(dict.fromkeys([*methods, *(["occlusion"] if _as_bool(occlusion) else [])]))
        self.target_layer = target_layer
        self.threshold = float(threshold)
        self.class_idx = class_idx
        self.image_key = image_key
        self.pred_key = pred_key
        self.occlusion_mask_size = occlusion_mask_size
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write_csv)

    def _reset(self, engine: Engine | None = None) -> None:
        self.rows = []

    def __call__(self, engine: Engine) -> None:
        # MONAI engines decollate the batch into a list of per-image dicts after each iteration
        items = engine.state.batch
        items = items if isinstance(items, list) else decollate_batch(items)
        names = [_filename(d[self.image_key]) for d in items]
        images = torch.stack([torch.as_tensor(d[self.image_key]) for d in items])
        probs = [float(torch.as_tensor(o[self.pred_key]).reshape(-1)[self.class_idx]) for o in engine.state.output]
        heatmaps = explain_batch(
            engine.network,
            images.to(next(engine.network.parameters()).device),
            target_layer=self.target_layer,
            methods=self.methods,
            class_idx=self.class_idx,
            occlusion_mask_size=self.occlusion_mask_size,
        )
        for i, (name, prob) in enumerate(zip(names, probs)):
            self.rows.append({"image": name, "covid_probability": f"{prob:.6f}", "label": int(prob >= self.threshold)})
            try:
                original = read_gray(name)
            except Exception as e:  # the file was readable when listed; report and go on
                print(f"error: {name}: cannot re-read image for the overlay ({e}); skipped", file=sys.stderr)
                continue
            stem = Path(name).stem
            box = crop_box(items[i][self.image_key])
            for method, maps in heatmaps.items():
                hm = unletterbox(maps[i, 0], original.shape, box)
                atomic_save_png(self.output_dir / f"{stem}_{method}.png", overlay_heatmap(original, hm))

    def write_csv(self, engine: Engine | None = None) -> Path:
        return atomic_write_csv(
            self.output_dir / "predictions.csv", self.rows, fieldnames=("image", "covid_probability", "label")
        )


class SliceClassifier:
    """One image file -> calibrated COVID probability, label and heatmap overlays, through a bundle's inference.json.

    The bundle's ``preprocessing`` (the same transforms as ``python -m monai.bundle run``), ``calibration``
    (``[a, b]``: probability ``sigmoid(a * logit + b)``), ``threshold``, ``explain_methods`` and ``explain_layer``
    are read from ``configs/inference.json``; the weights are ``models/model.pt`` (fp16 state dict).

    Args:
        bundle_dir: the bundle folder (e.g. ``bundles/covid_ct_slice_ctnet``).
        device: torch device.
    """

    def __init__(self, bundle_dir: str | os.PathLike, device: str | torch.device = "cpu") -> None:
        from monai.bundle import ConfigParser

        from monai_covid.inference.lesion import load_bundle_network

        self.bundle_dir = Path(bundle_dir)
        parser = ConfigParser()
        parser.read_config(str(self.bundle_dir / "configs" / "inference.json"))
        parser["bundle_root"] = str(self.bundle_dir)
        self.preprocessing = parser.get_parsed_content("preprocessing", instantiate=True)
        a, b = parser.get("calibration", [1.0, 0.0])
        self.calibration = (float(a), float(b))
        self.threshold = float(parser.get("threshold", 0.5))
        self.methods = list(parser.get("explain_methods", ["gradcam", "gradcampp"]))
        self.target_layer = str(parser.get("explain_layer", "attention3"))
        self.device = torch.device(device)
        self.network = load_bundle_network(self.bundle_dir, self.device)

    def __call__(self, path: str | os.PathLike) -> dict[str, Any]:
        """``{"covid_probability", "covid_label", "logit", "overlays": {method: uint8 (H, W, 3)}}`` for one image."""
        original = read_gray(path)
        if min(original.shape) < 8:
            raise ValueError(f"image is {original.shape[1]}x{original.shape[0]} pixels, smaller than 8")
        image = self.preprocessing({"image": str(path)})["image"]
        box = crop_box(image)
        x = torch.as_tensor(image).float()[None].to(self.device)
        with torch.no_grad():
            logit = float(self.network(x).reshape(-1)[0])
        prob = float(torch.sigmoid(torch.tensor(self.calibration[0] * logit + self.calibration[1])))
        maps = explain_batch(self.network, x, target_layer=self.target_layer, methods=self.methods) if self.methods else {}
        overlays = {m: overlay_heatmap(original, unletterbox(hm[0, 0], original.shape, box)) for m, hm in maps.items()}
        return {"covid_probability": prob, "covid_label": int(prob >= self.threshold), "logit": logit, "overlays": overlays}
