"""CT lesion segmentation with the A-SegNet bundle: 2D windowed slices and 3D CT in HU.

Used by ``bundles/covid_ct_lesion_asegnet/configs/inference.json`` and by the ``monai-covid`` command line.

Why the slices are cropped and resized rather than run at native resolution with a sliding window: the training
slices (MedSeg / COVID-SemiSeg) are crops around the lungs, 150-510 px a side, resized to 256 x 256 for training.
A 512 or 630 px CT slice run at native size would show the lesions at about twice the scale the network learnt.
So a 3D volume is cropped in-plane to the bounding box of its lungs (plus a margin), every slice of that crop is
resized to the training size, segmented slice by slice (``monai.inferers.SliceInferer``), and the lesion
probabilities are resized back and pasted into the full slice. ``image_size=None`` switches to native-resolution
sliding-window inference instead.

Intensity: the 8-bit training slices are lung-window display values scaled by 1/255. HU input is mapped with
``HU_WINDOW`` = [-1100, 250] HU -> [0, 1], the window that puts healthy lung (about -875 HU) and soft tissue
(about 35 HU) of real CT at the grey levels they have in the training slices (modes 44 and 218 of 255; see the
bundle README). The paper's [-1024, 600] would put soft tissue at 167/255, darker than anything trained on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from monai.inferers import Inferer, SliceInferer
from monai.transforms import Resize

__all__ = [
    "HU_WINDOW",
    "TRAIN_SIZE",
    "load_bundle_network",
    "slice_probabilities",
    "segment_slices",
    "segment_volume",
    "lung_bbox",
    "list_inputs",
    "load_case",
    "save_case",
    "LesionInferer",
    "prepare_case",
    "SaveLesionMask",
]

HU_WINDOW: tuple[float, float] = (-1100.0, 250.0)
TRAIN_SIZE: tuple[int, int] = (256, 256)


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def load_bundle_network(
    bundle_dir: str | os.PathLike, device: str | torch.device = "cpu", model_file: str | os.PathLike | None = None
) -> torch.nn.Module:
    """The network of a bundle (``network_def`` of ``configs/inference.json``) with ``models/model.pt`` loaded.

    The weights are a plain state_dict (fp16 in the repo), read with ``weights_only=True`` and cast to float32.
    Returns the network on ``device`` in eval mode, its weights in channels-last memory order on CUDA (faster
    convolutions with AMP) and wherever ``inference.json`` sets ``"channels_last": true`` (the CXR bundle: its
    DenseNet blocks run 1.5x faster on a CPU that way, ``benchmarks/cxr_v3_budget.py``).
    """
    from monai.bundle import ConfigParser

    bundle_dir = Path(bundle_dir)
    parser = ConfigParser()
    parser.read_config(str(bundle_dir / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle_dir)
    net = parser.get_parsed_content("network_def", instantiate=True)
    path = Path(model_file) if model_file is not None else bundle_dir / "models" / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model weights not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v.float() if torch.is_floating_point(v) else v for k, v in state.items()}
    net.load_state_dict(state)
    device = torch.device(device)
    net = net.to(device).eval()
    channels_last = bool(parser.get("channels_last", False)) or device.type == "cuda"
    return net.to(memory_format=torch.channels_last) if channels_last else net


def _softmax(net: torch.nn.Module, x: torch.Tensor, device: torch.device, amp: bool, tta: bool) -> torch.Tensor:
    """Class probabilities of ``x``; with ``tta`` averaged with the left-right mirrored slice."""
    with _autocast(device, amp):
        prob = torch.softmax(net(x).float(), dim=1)
        if tta:
            prob = 0.5 * (prob + torch.softmax(net(x.flip(-1)).float(), dim=1).flip(-1))
    return prob


@torch.no_grad()
def _predict(
    net: torch.nn.Module, batch: torch.Tensor, device: torch.device, amp: bool, batch_size: int, tta: bool = False
) -> torch.Tensor:
    """Lesion probability ``(N, H, W)`` of a ``(N, 1, H, W)`` batch, ``batch_size`` slices at a time."""
    out = []
    for i in range(0, batch.shape[0], batch_size):
        x = batch[i : i + batch_size].to(device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(_softmax(net, x, device, amp, tta)[:, 1].cpu())
    return torch.cat(out)


def slice_probabilities(
    net: torch.nn.Module,
    images: Sequence[np.ndarray],
    device: str | torch.device = "cpu",
    image_size: Sequence[int] = TRAIN_SIZE,
    batch_size: int = 8,
    amp: bool = True,
    tta: bool = False,
) -> list[np.ndarray]:
    """Lesion probability maps of 2D slices with intensities in [0, 1] (8-bit windowed slices divided by 255).

    Each ``(H, W)`` slice is resized to ``image_size`` exactly as in training (bilinear, anti-aliased), segmented,
    and its lesion probability resized back to ``(H, W)`` (bilinear). Returns float32 maps in [0, 1], one per input,
    each the size of its input. ``tta``: average with the left-right mirrored slice.
    """
    device = torch.device(device)
    resize = Resize(spatial_size=tuple(image_size), mode="bilinear", anti_aliasing=True)
    maps: list[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        chunk = [np.asarray(im, dtype=np.float32) for im in images[start : start + batch_size]]
        for im in chunk:
            if im.ndim != 2:
                raise ValueError(f"slice_probabilities expects (H, W) slices, got shape {im.shape}")
        batch = torch.stack([torch.as_tensor(resize(torch.from_numpy(im)[None])).as_tensor() for im in chunk])
        prob = _predict(net, batch, device, amp, batch_size, tta)
        for im, p in zip(chunk, prob):
            full = F.interpolate(p[None, None].float(), size=im.shape, mode="bilinear", align_corners=False)[0, 0]
            maps.append(full.numpy().astype(np.float32))
    return maps


def segment_slices(
    net: torch.nn.Module,
    images: Sequence[np.ndarray],
    device: str | torch.device = "cpu",
    image_size: Sequence[int] = TRAIN_SIZE,
    batch_size: int = 8,
    amp: bool = True,
    threshold: float = 0.5,
    tta: bool = False,
) -> list[np.ndarray]:
    """Lesion masks of 2D slices with intensities in [0, 1] (8-bit windowed slices divided by 255): the maps of
    :func:`slice_probabilities` above ``threshold``. Returns uint8 masks (0/1), one per input, each the size of its
    input. ``tta``: average with the left-right mirrored slice.
    """
    maps = slice_probabilities(net, images, device, image_size, batch_size, amp, tta)
    return [(m > threshold).astype(np.uint8) for m in maps]


def lung_bbox(lung: np.ndarray, margin: float = 0.05) -> tuple[slice, slice] | None:
    """In-plane ``(y, x)`` bounding box of a ``(z, y, x)`` lung mask over all slices, widened by ``margin`` of
    the slice size on each side; ``None`` when the mask is empty."""
    if not lung.any():
        return None
    ny, nx = lung.shape[-2:]
    ys = np.flatnonzero(lung.any(axis=(0, 2)))
    xs = np.flatnonzero(lung.any(axis=(0, 1)))
    my, mx = int(round(margin * ny)), int(round(margin * nx))
    return slice(max(0, ys[0] - my), min(ny, ys[-1] + 1 + my)), slice(max(0, xs[0] - mx), min(nx, xs[-1] + 1 + mx))


def segment_volume(
    net: torch.nn.Module,
    hu_zyx: np.ndarray,
    lung_mask: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    image_size: Sequence[int] | None = TRAIN_SIZE,
    roi: Sequence[int] = TRAIN_SIZE,
    hu_window: Sequence[float] = HU_WINDOW,
    amp: bool = True,
    chunk_slices: int = 32,
    threshold: float = 0.5,
    tta: bool = False,
) -> np.ndarray:
    """Lesion mask ``(z, y, x)`` uint8 (0/1) of a CT volume in HU.

    Args:
        net: 2D segmentation network (``(B, 1, H, W)`` -> ``(B, 2, H, W)`` logits), in eval mode.
        hu_zyx: CT in Hounsfield units, ``(z, y, x)``.
        lung_mask: bool ``(z, y, x)``; the volume is cropped in-plane to its bounding box and lesions outside it
            are removed. ``None``: the whole slice is segmented and nothing is removed.
        device: where the network runs; on CUDA with ``amp`` it runs in float16 autocast.
        batch_size: slices per forward pass.
        image_size: the training slice size the crop is resized to; ``None``: native resolution with a sliding
            window of ``roi``.
        roi: sliding-window size for ``image_size=None``.
        hu_window: HU range mapped to [0, 1] (see the module docstring).
        chunk_slices: slices windowed, resized and inferred at once, which bounds memory for long volumes.
        threshold: lesion probability threshold.
        tta: average with the left-right mirrored slices.
    """
    from data_prep.intensity import HUWindow

    hu_zyx = np.asarray(hu_zyx)
    if hu_zyx.ndim != 3:
        raise ValueError(f"segment_volume expects a (z, y, x) volume, got shape {hu_zyx.shape}")
    if lung_mask is not None and lung_mask.shape != hu_zyx.shape:
        raise ValueError(f"lung mask shape {lung_mask.shape} differs from the volume {hu_zyx.shape}")
    device = torch.device(device)
    window = HUWindow(*hu_window)
    box = lung_bbox(lung_mask) if lung_mask is not None else None
    if lung_mask is not None and box is None:
        return np.zeros(hu_zyx.shape, dtype=np.uint8)  # no lung, no lung lesion
    ys, xs = box if box is not None else (slice(None), slice(None))
    out = np.zeros(hu_zyx.shape, dtype=np.uint8)

    def _run(x: torch.Tensor) -> torch.Tensor:
        return _softmax(net, x, device, amp, tta)

    # SliceInferer runs the 2D network over the slices of a (1, 1, z, y, x) volume (spatial_dim 0 = z), batch_size
    # slices per call, with a sliding window of roi_size over each (one window when the slice is image_size).
    size2d = tuple(image_size) if image_size is not None else tuple(roi)
    inferer = SliceInferer(roi_size=size2d, sw_batch_size=batch_size, spatial_dim=0, mode="gaussian", overlap=0.25)
    with torch.no_grad():
        for z0 in range(0, hu_zyx.shape[0], chunk_slices):
            crop = torch.from_numpy(np.ascontiguousarray(hu_zyx[z0 : z0 + chunk_slices, ys, xs], dtype=np.float32))
            crop = torch.as_tensor(window(crop))
            h, w = crop.shape[-2:]
            if image_size is not None:
                # (n, h, w) as channels: Resize treats each slice alike, bilinear + anti-aliasing as in training
                crop = Resize(spatial_size=size2d, mode="bilinear", anti_aliasing=True)(crop).as_tensor()
            prob = inferer(crop[None, None].to(device), _run)[0, 1].float().cpu()  # (n, H', W')
            if image_size is not None:
                prob = F.interpolate(prob[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            out[z0 : z0 + chunk_slices, ys, xs] = (prob > threshold).numpy()
    if lung_mask is not None:
        out &= lung_mask.astype(np.uint8)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Batch inference over a folder (the bundle's inference.json and the command line)
# ---------------------------------------------------------------------------------------------------------------


def list_inputs(dataset_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Datalist of a folder: every 2D slice (png/jpg), NIfTI file and DICOM series under ``dataset_dir``.

    Each item: ``image`` (path), ``kind`` (``"image"``, ``"nifti"`` or ``"dicom"``), ``name`` (output stem).
    """
    from data_prep.io import find_cases, safe_name

    root = Path(dataset_dir)
    if not root.exists():
        raise FileNotFoundError(f"{root}: input folder not found")
    items = []
    for case in find_cases(root, include_images=True):
        if case.error:
            raise ValueError(f"{case.path}: {case.error}")
        name = Path(case.path).stem if case.kind == "image" else safe_name(case.rel)
        items.append({"image": case.path, "kind": case.kind, "name": name})
    if not items:
        raise FileNotFoundError(f"{root}: no png/jpg slices, NIfTI files or DICOM series found")
    return items


def load_case(item: dict[str, Any], with_lung_mask: bool = True) -> dict[str, Any]:
    """Read one datalist item: a 2D slice as ``image`` (H, W) float32 in [0, 1]; a volume as ``volume``
    (``data_prep.io.Volume``, HU) and, with ``with_lung_mask``, ``lung`` (bool (z, y, x))."""
    out = dict(item)
    path = Path(item["image"])
    if item["kind"] == "image":
        from PIL import Image

        try:
            with Image.open(path) as im:
                out["image"] = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
        except OSError as e:
            raise ValueError(f"{path}: not a readable image ({e})") from e
        return out
    from data_prep.io import read_volume
    from data_prep.lung import lung_mask

    vol = read_volume(path)
    out["volume"] = vol
    out["lung"] = lung_mask(vol.array, vol.spacing) if with_lung_mask else None
    return out


def save_case(case: dict[str, Any], mask: np.ndarray, output_dir: str | os.PathLike) -> Path:
    """Write a lesion mask atomically: ``<name>_seg.png`` (0/255) for slices, ``<name>_seg.nii.gz`` (0/1, the
    input's geometry) for volumes."""
    from monai_covid.io_utils import atomic_save_png

    out_dir = Path(output_dir)
    if case["kind"] == "image":
        return atomic_save_png(out_dir / f"{case['name']}_seg.png", (np.asarray(mask) > 0).astype(np.uint8) * 255)
    from data_prep.io import write_like

    return write_like(np.asarray(mask, dtype=np.uint8), case["volume"], out_dir / f"{case['name']}_seg.nii.gz")


def prepare_case(batchdata: dict[str, Any], device: Any = None, non_blocking: bool = False, **kwargs):
    """``prepare_batch`` for ``SupervisedEvaluator``: the whole case dict is the inferer's input, no label."""
    return batchdata, None


class LesionInferer(Inferer):
    """Inferer for a case dict from :func:`load_case`: :func:`segment_slices` for a slice, :func:`segment_volume`
    for a volume, lesion where the probability is above ``threshold`` (the bundle's ``inference.json`` key
    ``threshold``). Returns the uint8 (0/1) mask as a numpy array of the input's shape."""

    def __init__(
        self,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        image_size: Sequence[int] | None = TRAIN_SIZE,
        hu_window: Sequence[float] = HU_WINDOW,
        amp: bool = True,
        chunk_slices: int = 32,
        tta: bool = False,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        self.tta = tta
        self.threshold = float(threshold)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.image_size = tuple(image_size) if image_size is not None else None
        self.hu_window = tuple(hu_window)
        self.amp = amp
        self.chunk_slices = chunk_slices

    def __call__(self, inputs: dict[str, Any], network: torch.nn.Module, *args: Any, **kwargs: Any) -> np.ndarray:
        network.eval()
        if inputs["kind"] == "image":
            size = self.image_size or TRAIN_SIZE
            return segment_slices(
                network,
                [inputs["image"]],
                self.device,
                size,
                self.batch_size,
                self.amp,
                threshold=self.threshold,
                tta=self.tta,
            )[0]
        vol = inputs["volume"]
        return segment_volume(
            network,
            vol.array,
            inputs.get("lung"),
            self.device,
            batch_size=self.batch_size,
            image_size=self.image_size,
            hu_window=self.hu_window,
            amp=self.amp,
            chunk_slices=self.chunk_slices,
            threshold=self.threshold,
            tta=self.tta,
        )


class SaveLesionMask:
    """Post-processing for the evaluator's output dict: write ``pred`` for the case in ``image`` (see
    :func:`save_case`) and keep only light entries, so a long run does not hold every volume in memory."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir)

    def __call__(self, output: dict[str, Any]) -> dict[str, Any]:
        case, mask = output["image"], output["pred"]
        path = save_case(case, mask, self.output_dir)
        return {"name": case["name"], "kind": case["kind"], "output": str(path), "lesion_voxels": int(np.count_nonzero(mask))}
