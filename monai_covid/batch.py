"""``monai-covid infer``: batch inference over a folder of CT/CXR studies.

For each CT case the volume is decoded once and the lung mask computed once; the lesion model (A-SegNet by
default, Co-supervision ResUnet with ``--models cosup``) and the volume COVID detector (ResNeXt+) share them.
Every case is isolated: a broken case is reported with ``status=failed`` and a one-line error, and the batch goes
on. Outputs go to ``OUTPUT/<case_id>/`` and are written atomically, ``result.json`` last, so a case whose
``result.json`` says ``complete`` is skipped on a rerun (unless ``--overwrite``). Nothing is written inside INPUT.

Scale-out: under ``torchrun --nproc_per_node N -m monai_covid.cli infer ...`` each rank takes every N-th case and
rank 0 writes the merged report.
"""

from __future__ import annotations

import html
import json
import os
import re
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.io import Case, InputError, find_cases, read_volume, safe_name, write_like
from monai_covid.io_utils import (
    atomic_save_png,
    atomic_save_with,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    display_text,
)

__all__ = [
    "run_batch", "ModelSet", "process_ct_case", "REPORT_COLUMNS", "BUNDLES", "bundles_dir", "overlay_montage",
    "write_dicom_seg", "SegNotWritten", "seg_source_problems", "seg_dataset_problems", "detector_coverage",
]

REPORT_COLUMNS = [
    "case_id", "source", "modality", "status", "error", "warnings", "covid_probability", "lung_volume_ml",
    "lesion_volume_ml", "lesion_percent_of_lung", "n_slices", "seconds", "models",
]
#: Output names a case folder may not take (compared case-insensitively): the batch's own files.
RESERVED_NAMES = {"report", "report.csv", "report.html", "skipped", "skipped.csv"}
RESULT_VERSION = 2  # 2: warnings, dicom_seg (validated SEG or the reason), detector_coverage; older results are recomputed

#: model name -> (bundle folder, role)
BUNDLES = {
    "asegnet": ("covid_ct_lesion_asegnet", "lesion"),
    "cosup": ("covid_ct_lesion_cosup_resunet", "lesion"),
    "resnextplus": ("covid_ct_volume_resnextplus", "detector"),
    "cxr": ("covid_cxr_infection_map_unet", "cxr"),
    "ctnet": ("covid_ct_slice_ctnet", "slice"),
}


def bundles_dir() -> Path:
    """The bundles shipped with the repo (``MONAI_COVID_BUNDLES`` overrides)."""
    env = os.environ.get("MONAI_COVID_BUNDLES")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "bundles"


def _installed(name: str) -> bool:
    folder, _ = BUNDLES[name]
    b = bundles_dir() / folder
    return (b / "models" / "model.pt").is_file() and (b / "configs" / "inference.json").is_file()


class ModelSet:
    """The networks a batch uses, loaded once on first use."""

    def __init__(self, names: list[str] | None, device: str = "auto", batch_size: int = 8) -> None:
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda requested but no CUDA device is available")
        self.device = device
        self.batch_size = batch_size
        if names is None:
            names = [n for n in ("asegnet", "resnextplus", "cxr", "ctnet") if _installed(n)]
        unknown = sorted(set(names) - set(BUNDLES))
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; choose from {sorted(BUNDLES)}")
        missing = [n for n in names if not _installed(n)]
        if missing:
            raise ValueError(f"model(s) {missing} have no weights under {bundles_dir()}")
        lesion = [n for n in names if BUNDLES[n][1] == "lesion"]
        if len(lesion) > 1:
            raise ValueError(f"choose one lesion model, not {lesion}")
        self.names = names
        self.lesion_name = lesion[0] if lesion else None
        self._nets: dict[str, Any] = {}
        self._configs: dict[str, Any] = {}

    def signature(self) -> dict[str, str]:
        """What made a case's results, per model: the bundle's version and a SHA-256 of its weights and inference
        settings (``models/model.pt``, ``configs/inference.json``, ``models/detector.json`` when present). A rerun
        reuses a finished case only when this matches, so new weights, another threshold or other ``--models`` are
        never mixed with old results."""
        if not hasattr(self, "_signature"):
            import hashlib

            sig = {}
            for name in self.names:
                b = self._bundle(name)
                h = hashlib.sha256()
                for rel in ("models/model.pt", "configs/inference.json", "models/detector.json"):
                    f = b / rel
                    if f.is_file():
                        h.update(rel.encode() + b"\0" + f.read_bytes())
                try:
                    version = json.loads((b / "configs" / "metadata.json").read_text()).get("version", "?")
                except (OSError, ValueError):
                    version = "?"
                sig[name] = f"{version}+{h.hexdigest()[:16]}"
            self._signature = sig
        return self._signature

    def has(self, role: str) -> bool:
        return any(BUNDLES[n][1] == role for n in self.names)

    def _bundle(self, name: str) -> Path:
        return bundles_dir() / BUNDLES[name][0]

    def net(self, name: str):
        if name not in self._nets:
            from monai_covid.inference.lesion import load_bundle_network

            self._nets[name] = load_bundle_network(self._bundle(name), self.device)
        return self._nets[name]

    def cxr_detector(self):
        """The CXR bundle's detector (:func:`monai_covid.cxr_detector.bundle_detector`), read once."""
        if "cxr_detector" not in self._nets:
            from monai_covid.cxr_detector import bundle_detector

            self._nets["cxr_detector"] = bundle_detector(self._bundle("cxr"))
        return self._nets["cxr_detector"]

    def config(self, name: str, key: str, default: Any = None) -> Any:
        """A plain value from a bundle's ``inference.json`` (thresholds, sizes), without building anything."""
        from monai.bundle import ConfigParser

        if name not in self._configs:
            parser = ConfigParser()
            parser.read_config(str(self._bundle(name) / "configs" / "inference.json"))
            self._configs[name] = parser
        node: Any = self._configs[name].config
        for part in key.split("#"):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    # ------------------------------------------------------------------ model calls
    def segment_lesions(self, hu: np.ndarray, lung: np.ndarray) -> np.ndarray:
        from monai_covid.inference.lesion import segment_volume

        threshold = float(self.config(self.lesion_name, "threshold", 0.5))  # the bundle's lesion probability cut
        return segment_volume(
            self.net(self.lesion_name), hu, lung, device=self.device, batch_size=self.batch_size, threshold=threshold
        )

    def detect_covid(self, hu: np.ndarray, lung: np.ndarray) -> tuple[float, np.ndarray]:
        from monai_covid.volume_detector import predict_volume

        size = int(self.config("resnextplus", "preprocessing#image_size", 128))
        chunk = int(self.config("resnextplus", "inferer#chunk_size", 32))
        return predict_volume(self.net("resnextplus"), hu, lung, size=size, chunk_size=chunk, device=self.device)

    def classify_slice(self, path: Path) -> dict[str, Any]:
        """CT-Net on one 2D CT image (png/jpg, RGB or gray): calibrated COVID probability + Grad-CAM(++) overlays."""
        if "ctnet" not in self._nets:
            from monai_covid.explain import SliceClassifier

            self._nets["ctnet"] = SliceClassifier(self._bundle("ctnet"), self.device)
        return self._nets["ctnet"](path)


# ---------------------------------------------------------------------------------------------- pictures
def _gray(hu: np.ndarray, lo: float = -1350.0, hi: float = 150.0) -> np.ndarray:
    return (np.clip((hu - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _edge(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    return mask & ~ndi.binary_erosion(mask)


def overlay_slice(hu: np.ndarray, lung: np.ndarray | None, lesion: np.ndarray | None, size: int = 256) -> np.ndarray:
    """RGB uint8 ``(size, size, 3)``: lung window image, lesions in red, lung outline in green."""
    from PIL import Image

    g = _gray(hu)
    rgb = np.stack([g, g, g], -1).astype(np.float32)
    if lesion is not None and lesion.any():
        les = lesion.astype(bool)
        rgb[les] = 0.45 * rgb[les] + 0.55 * np.array([255, 30, 30])
    if lung is not None:
        rgb[_edge(lung.astype(bool))] = (40, 220, 80)
    img = Image.fromarray(rgb.astype(np.uint8)).resize((size, size), Image.BILINEAR)
    return np.asarray(img)


def overlay_montage(hu: np.ndarray, lung: np.ndarray, lesion: np.ndarray | None, n: int = 12, cols: int = 4) -> np.ndarray:
    """Montage of ``n`` axial slices: those with the most lesion, else evenly spaced through the lungs."""
    z_lung = np.flatnonzero(lung.any(axis=(1, 2))) if lung.any() else np.arange(hu.shape[0])
    if lesion is not None and lesion.any():
        area = lesion.sum(axis=(1, 2))
        picks = sorted(np.argsort(area)[::-1][: min(n, int((area > 0).sum()))])
    else:
        picks = []
    if len(picks) < n:
        extra = np.linspace(z_lung[0], z_lung[-1], n).round().astype(int)
        picks = sorted(set(picks) | set(extra.tolist()))[:n]
    tiles = [overlay_slice(hu[z], lung[z], None if lesion is None else lesion[z]) for z in picks]
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[i : i + cols], axis=1) for i in range(0, len(tiles), cols)]
    return np.concatenate(rows, axis=0)


# ---------------------------------------------------------------------------------------------- DICOM SEG
class SegNotWritten(Exception):
    """The DICOM SEG would not be valid DICOM (a PACS would reject it); the message says why, in one line."""


_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
#: Attributes highdicom copies from the source into the SEG that identify nothing the SEG's linking depends on: an
#: invalid value is left empty (type 2) or left out (type 3) in the SEG, and result.json says so.
_SEG_TYPE2_REPAIRABLE = {"PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName",
                         "StudyID", "AccessionNumber"}
_SEG_TYPE3_REPAIRABLE = {"StudyDescription", "PatientAge", "PatientSize", "PatientWeight", "PatientComments",
                         "OtherPatientIDs", "PatientBirthTime", "EthnicGroup", "PatientAddress"}
_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UI", "UC"}


def _uid_problem(value: Any) -> str | None:
    v = str(value if value is not None else "")
    if not v:
        return "is empty"
    if len(v) > 64:
        return f"has {len(v)} characters (at most 64)"
    if not _UID_RE.fullmatch(v):  # the value itself is not shown: it identifies a study
        if re.fullmatch(r"[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}", v):
            return "is UUID text, not a DICOM UID (digits and dots)"
        return "is not a DICOM UID (digits and dots, no leading zeros)"
    return None


def seg_source_problems(headers: list) -> list[str]:
    """Why the source slices cannot be referenced by a valid SEG: empty, non-numeric (UUID text), over-long or
    duplicated UIDs. A SEG carries the source's Study/Frame of Reference UIDs and references every source SOP
    instance; none of these can be changed without breaking the link to the images in the PACS."""
    problems = []
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = sorted({str(h.get(key, "") or "") for h in headers})
        for v in values:
            why = _uid_problem(v)
            if why:
                problems.append(f"source {key} {why}")
        if len(values) > 1:
            problems.append(f"source slices have {len(values)} different {key}s")
    for key in ("SOPInstanceUID", "SOPClassUID"):
        whys = [w for w in (_uid_problem(h.get(key, "")) for h in headers) if w]
        if whys:
            what = "are empty" if whys[0] == "is empty" else f"are invalid (the first {whys[0]})"
            problems.append(f"{len(whys)} of {len(headers)} source {key}s {what}")
    sops = [str(h.get("SOPInstanceUID", "") or "") for h in headers]
    if all(sops) and len(set(sops)) < len(sops):
        problems.append(f"{len(sops) - len(set(sops))} source SOPInstanceUIDs are duplicated")
    return problems


def _vm_allowed(spec: str, n: int) -> bool:
    """Does a value multiplicity ``n`` satisfy a dictionary VM like ``1``, ``1-3``, ``1-n``, ``2-2n``?"""
    if n == 0:
        return True
    lo, _, hi = spec.partition("-")
    if not hi:
        return not lo.isdigit() or n == int(lo)
    if hi.endswith("n"):
        step = int(hi[:-1] or 1)
        return n >= int(lo) and n % step == 0
    return int(lo) <= n <= int(hi)


def _default_charset(ds) -> bool:
    """No SpecificCharacterSet (or ISO_IR 6): text values must be ASCII."""
    cs = ds.get("SpecificCharacterSet")
    if cs is None:
        return True
    return all(str(v).strip() in ("", "ISO_IR 6") for v in ([cs] if isinstance(cs, str) else list(cs)))


def seg_dataset_problems(ds, prefix: str = "", ascii_only: bool | None = None) -> list[tuple[str, str]]:
    """``(attribute path, problem)`` for every value of ``ds`` (recursively) a DICOM validator would reject: UIDs
    (empty or malformed), values invalid for their VR (length, characters, dates), control characters in short
    text, non-ASCII text without a SpecificCharacterSet, and value multiplicities the data dictionary does not allow
    (a backslash in a single-valued LO)."""
    if ascii_only is None:
        ascii_only = _default_charset(ds)
    problems: list[tuple[str, str]] = []
    for elem in ds:
        name = prefix + (elem.keyword or str(elem.tag))
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value or []):
                problems += seg_dataset_problems(item, f"{name}[{i}].", ascii_only)
            continue
        problems += [(name, why) for why in _element_problems(elem, ascii_only)]
    return problems


#: Enumerated values highdicom enforces on attributes it copies from the source.
_ENUMERATED = {"PatientSex": {"M", "F", "O"}}


def _element_problems(elem, ascii_only: bool = False) -> list[str]:
    """What a DICOM validator would reject in one (non-sequence) element (``ascii_only``: the dataset declares no
    character set)."""
    from pydicom import config
    from pydicom.datadict import dictionary_VM
    from pydicom.multival import MultiValue
    from pydicom.valuerep import validate_value

    if elem.VR not in _TEXT_VRS or elem.tag.is_private:
        return []
    values = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
    if elem.VR == "UI" and not any(str(v or "") for v in values):
        return ["empty UID"]
    problems = []
    try:
        spec = dictionary_VM(elem.tag)
    except KeyError:
        spec = ""
    if spec and not _vm_allowed(spec, elem.VM):
        problems.append(f"{elem.VM} values where the dictionary allows {spec}")
    for v in values:
        if v is None or v == "":
            continue
        if elem.VR == "UI":
            why = _uid_problem(v)
            if why:
                problems.append(f"UID {why}")
            continue
        orig = getattr(v, "original_string", None)  # as read: DS/IS text, PN bytes
        text = orig.decode("latin-1") if isinstance(orig, bytes) else str(orig or v)
        if any(ord(c) < 0x20 and c != "\x1b" for c in text):
            problems.append("control character in the value")
            continue
        if ascii_only and not text.isascii():
            problems.append("non-ASCII text but no SpecificCharacterSet")
            continue
        allowed = _ENUMERATED.get(elem.keyword)
        if allowed and text not in allowed:
            problems.append(f"{display_text(text)[:20]!r} is not one of {sorted(allowed)}")
            continue
        try:
            validate_value(elem.VR, text, config.RAISE)
        except (ValueError, TypeError) as e:
            problems.append(display_text(" ".join(str(e).split()))[:120])
    return problems


def _repair_seg(ds, repairs: list[str]) -> None:
    """Blank (type 2) or drop (type 3) invalid top-level values that do not link a SEG to its source; each
    attribute is noted once in ``repairs``."""
    for name in sorted(_SEG_TYPE2_REPAIRABLE | _SEG_TYPE3_REPAIRABLE):
        if name not in ds:
            continue
        why = _element_problems(ds[name])
        if not why:
            continue
        if name in _SEG_TYPE2_REPAIRABLE:
            delattr(ds, name)  # a new element, not the old one changed: it may be shared with the source header
            setattr(ds, name, "")
            note = f"{name}: {why[0]}; left empty in the SEG (source unchanged)"
        else:
            delattr(ds, name)
            note = f"{name}: {why[0]}; left out of the SEG (source unchanged)"
        if not any(r.startswith(f"{name}:") for r in repairs):
            repairs.append(note)


def _header_copy(ds):
    """A new dataset holding the same elements as ``ds`` (adding, deleting or replacing an element leaves ``ds`` as it
    was; the repairs here only do that). ``copy.copy`` would share the element dict; a deep copy costs ~7 ms a slice."""
    import pydicom

    out = pydicom.Dataset({tag: ds.get_item(tag) for tag in ds.keys()})
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    return out


def _declare_latin1(ds, repairs: list[str]) -> None:
    """Text that is not ASCII under no SpecificCharacterSet (old exports write Latin-1 bytes and declare nothing) was
    read as Latin-1; the SEG declares ISO_IR 100 so that the same bytes are valid there."""
    if not _default_charset(ds):
        return
    texts = [e for e in ds if e.VR in ("PN", "LO", "SH", "ST", "LT", "UT", "UC") and not e.tag.is_private]
    if any(not str(e.value if e.value is not None else "").isascii() for e in texts):
        if "SpecificCharacterSet" in ds:
            del ds.SpecificCharacterSet  # replaced, not changed in place (see _header_copy)
        ds.SpecificCharacterSet = "ISO_IR 100"
        note = ("SpecificCharacterSet: the source's text is not ASCII and declares no character set; the SEG declares "
                "ISO_IR 100 (Latin-1, as the bytes were read), the bytes unchanged")
        if note not in repairs:
            repairs.append(note)


def write_dicom_seg(mask: np.ndarray, volume, path: Path, algorithm: str, repairs: list[str] | None = None) -> Path:
    """DICOM Segmentation (binary, one segment) referencing the source instances, via highdicom.

    Validated before it is written: the source UIDs first (:func:`seg_source_problems`), then every value of the
    SEG highdicom built (:func:`seg_dataset_problems`). Invalid copied values that do not link the SEG to its
    source (a StudyDescription with a backslash, a malformed PatientSex) are repaired in the SEG and listed in
    ``repairs``; anything else raises :class:`SegNotWritten` and nothing is written.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from monai_covid import __version__

    problems = seg_source_problems(volume.headers)
    if problems:
        raise SegNotWritten("; ".join(problems[:3]))
    sources = []
    done: list[str] = []
    for h in volume.headers:
        h = _header_copy(h)  # type-2 values get filled, invalid ones replaced: never in the source header
        for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber"):
            if key not in h:
                setattr(h, key, "")
        _repair_seg(h, done)  # highdicom copies these into the SEG (and refuses some invalid ones)
        _declare_latin1(h, done)
        sources.append(h)
    desc = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="COVID-19 lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm, version=__version__, family=codes.DCM.ArtificialIntelligence
        ),
    )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's value warnings: the validation below reports them in one line
        try:
            seg = _build_seg(hd, sources, mask, desc, algorithm, __version__)
        except (ValueError, TypeError, AttributeError) as e:
            raise SegNotWritten(f"highdicom refused the source ({display_text(' '.join(str(e).split()))[:200]})") from None
    _repair_seg(seg, done)
    left = seg_dataset_problems(seg)
    if left:
        raise SegNotWritten("; ".join(f"{name}: {why}" for name, why in left[:3])
                            + (f" (and {len(left) - 3} more)" if len(left) > 3 else ""))
    if repairs is not None:
        repairs.extend(done)
    return atomic_save_with(path, lambda tmp: seg.save_as(tmp, enforce_file_format=True) if _has_enforce() else seg.save_as(tmp))


def _build_seg(hd, sources, mask, desc, algorithm, version):
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[desc],
        series_instance_uid=hd.UID(),
        series_number=9901,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="monai-covid",
        manufacturer_model_name=f"monai-covid {algorithm}",
        software_versions=version,
        device_serial_number="none",
        series_description=f"COVID-19 lesions ({algorithm})",
        omit_empty_frames=False,
    )


def _has_enforce() -> bool:
    import inspect

    import pydicom

    return "enforce_file_format" in inspect.signature(pydicom.Dataset.save_as).parameters


# ---------------------------------------------------------------------------------------------- cases
@dataclass
class Job:
    case: Case
    case_id: str


def _load_result(out_dir: Path, signature: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The finished result of a case, or None when it must be (re)computed: incomplete, of another format, made by
    other models, weights or settings than ``signature`` (``ModelSet.signature``), or with an output missing."""
    path = out_dir / "result.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not result.get("complete") or result.get("version") != RESULT_VERSION:
        return None
    if signature is not None and result.get("model_signature") != signature:
        return None
    if any(not (out_dir / f).is_file() for f in result.get("outputs", {}).values()):
        return None
    return result


#: The volume detector (ResNeXt+) was trained on bags of up to 32 slices drawn from whole-chest series (P001,
#: normal001: ~150 slices, ~300 mm) and 2D slices; on fewer slices, or on a short stretch of lung, its probability
#: has no meaning for the scan. Below either minimum the case gets no COVID call and a warning (the probability is
#: still reported).
DETECTOR_MIN_SLICES = 32
DETECTOR_MIN_LUNG_EXTENT_MM = 150.0


def detector_coverage(lung: np.ndarray, spacing_zyx: tuple[float, float, float]) -> dict[str, Any]:
    """How much of the chest a series covers, and whether the volume detector's call is meaningful on it."""
    n = int(lung.shape[0])
    z = np.flatnonzero(lung.reshape(n, -1).any(axis=1))
    extent = float((z[-1] - z[0] + 1) * spacing_zyx[0]) if z.size else 0.0
    return {
        "n_slices": n,
        "lung_extent_mm": round(extent, 1),
        "lung_in_first_slice": bool(z.size and z[0] == 0),
        "lung_in_last_slice": bool(z.size and z[-1] == n - 1),
        "min_slices": DETECTOR_MIN_SLICES,
        "min_lung_extent_mm": DETECTOR_MIN_LUNG_EXTENT_MM,
        "assessable": n >= DETECTOR_MIN_SLICES and extent >= DETECTOR_MIN_LUNG_EXTENT_MM,
    }


def coverage_warning(cov: dict[str, Any], prob: float) -> str:
    cut = [w for w, k in (("first", "lung_in_first_slice"), ("last", "lung_in_last_slice")) if cov[k]]
    cut_text = f", lung cut off at the {' and '.join(cut)} slice" if cut else ""
    return (f"partial series ({cov['n_slices']} slices, {cov['lung_extent_mm']:.0f} mm of lung{cut_text}): the volume "
            f"COVID detector needs a whole-chest series (at least {cov['min_slices']} slices and "
            f"{cov['min_lung_extent_mm']:.0f} mm of lung), so its P(COVID) {prob:.2f} is no COVID/not-COVID call "
            f"for this scan; the lung mask and lesion segmentation are valid")


def process_ct_case(job: Job, models: ModelSet, out_dir: Path, write_seg: bool = True) -> dict[str, Any]:
    """Run the CT models on one case and write its outputs; returns the result record (no status fields)."""
    from data_prep.lung import lung_mask, lung_volume_ml

    vol = read_volume(job.case.series if job.case.series is not None else job.case.path)
    if vol.n_slices < 2:
        raise InputError(job.case.path, f"a CT volume needs at least 2 slices, got {vol.n_slices}")
    lung = lung_mask(vol.array, vol.spacing)
    if not lung.any():
        raise InputError(job.case.path, "no lung found (is this a chest CT in HU?)")
    outputs: dict[str, str] = {}
    warnings: list[str] = []
    record: dict[str, Any] = {"n_slices": vol.n_slices, "spacing_zyx_mm": list(vol.spacing),
                              "shape_zyx": list(vol.array.shape), "warnings": warnings}
    record["lung_volume_ml"] = round(lung_volume_ml(lung, vol.spacing), 1)
    write_like(lung.astype(np.uint8), vol, out_dir / "lung_mask.nii.gz")
    outputs["lung_mask"] = "lung_mask.nii.gz"
    lesion = None
    if models.lesion_name:
        lesion = models.segment_lesions(vol.array, lung).astype(bool) & lung
        write_like(lesion.astype(np.uint8), vol, out_dir / "lesion_seg.nii.gz")
        outputs["lesion_seg"] = "lesion_seg.nii.gz"
        lesion_ml = lung_volume_ml(lesion, vol.spacing)
        record["lesion_volume_ml"] = round(lesion_ml, 2)
        record["lesion_percent_of_lung"] = round(100.0 * lesion_ml / max(record["lung_volume_ml"], 1e-6), 3)
        record["lesion_threshold"] = float(models.config(models.lesion_name, "threshold", 0.5))  # the cut applied
        if write_seg and vol.kind == "dicom":
            repairs: list[str] = []
            try:
                write_dicom_seg(lesion, vol, out_dir / "lesion_seg.dcm", algorithm=models.lesion_name, repairs=repairs)
            except SegNotWritten as e:
                (out_dir / "lesion_seg.dcm").unlink(missing_ok=True)  # a SEG of an earlier run of this case
                record["dicom_seg"] = {"written": False, "reason": str(e)}
                warnings.append(f"no DICOM SEG: {e}; the NIfTI outputs are complete")
            else:
                outputs["dicom_seg"] = "lesion_seg.dcm"
                record["dicom_seg"] = {"written": True, "repairs": repairs}
                if repairs:
                    warnings.append(f"DICOM SEG written with {len(repairs)} repaired value(s), see result.json")
    if models.has("detector"):
        prob, slice_scores = models.detect_covid(vol.array, lung)
        slice_thr = float(models.config("resnextplus", "postprocessing#slice_threshold", 0.5))
        volume_thr = float(models.config("resnextplus", "postprocessing#volume_threshold", 0.5))
        coverage = detector_coverage(lung, vol.spacing)
        record["covid_probability"] = round(float(prob), 4)
        record["detector_coverage"] = coverage
        # a partial series gets no COVID/not-COVID call: the probability is kept, with the reason beside it
        record["covid_label"] = int(prob >= volume_thr) if coverage["assessable"] else None
        if not coverage["assessable"]:
            warnings.append(coverage_warning(coverage, prob))
        record["slice_scores"] = [round(float(s), 4) for s in slice_scores]
        record["slice_covid"] = [int(s >= slice_thr) for s in slice_scores]
        record["instance_numbers"] = vol.instance_numbers or list(range(1, vol.n_slices + 1))
        if lesion is not None:  # the lesion model's burden per slice: a feature beside the detector, not its decision
            lung_px = np.maximum(lung.reshape(vol.n_slices, -1).sum(1), 1)
            record["slice_lesion_percent_of_lung"] = [round(float(v), 2) for v in 100.0 * lesion.reshape(vol.n_slices, -1).sum(1) / lung_px]
    atomic_save_png(out_dir / "overlay.png", overlay_montage(vol.array, lung, lesion))
    outputs["overlay"] = "overlay.png"
    record["outputs"] = outputs
    return record


def process_image_case(job: Job, models: ModelSet, out_dir: Path, modality: str) -> dict[str, Any]:
    """A 2D image: CT slice (``--modality ct``: lesion model and/or CT-Net) or chest X-ray (``cxr``, infection map)."""
    path = Path(job.case.path)
    if modality != "ct":
        return _run_cxr(models, path, out_dir)
    from PIL import Image

    try:
        with Image.open(path) as im:
            gray = np.asarray(im.convert("L"), dtype=np.float32)
    except Exception as e:
        raise InputError(path, f"not a readable image ({type(e).__name__})") from None
    if not models.lesion_name and not models.has("slice"):
        raise InputError(path, "no lesion model or slice classifier (ctnet) selected for a CT slice")
    record: dict[str, Any] = {"n_slices": 1, "shape_zyx": [1, *gray.shape], "outputs": {}}
    if models.has("slice"):
        res = models.classify_slice(path)
        record["covid_probability"] = round(res["covid_probability"], 4)
        record["covid_label"] = res["covid_label"]
        for method, rgb in res["overlays"].items():
            atomic_save_png(out_dir / f"{method}.png", rgb)
            record["outputs"][method] = f"{method}.png"
    if not models.lesion_name:
        if "gradcam" in record["outputs"]:
            record["outputs"]["overlay"] = record["outputs"]["gradcam"]
        return record
    from monai_covid.inference.lesion import segment_slices

    mask = segment_slices(models.net(models.lesion_name), [gray / 255.0], device=models.device)[0]
    atomic_save_png(out_dir / "lesion_seg.png", (mask > 0).astype(np.uint8) * 255)
    g = gray.astype(np.uint8)
    rgb = np.stack([g, g, g], -1).astype(np.float32)
    m = mask.astype(bool)
    rgb[m] = 0.45 * rgb[m] + 0.55 * np.array([255, 30, 30])
    atomic_save_png(out_dir / "overlay.png", rgb.astype(np.uint8))
    record["lesion_percent_of_image"] = round(100.0 * float(mask.mean()), 3)
    record["outputs"].update({"lesion_seg": "lesion_seg.png", "overlay": "overlay.png"})
    return record


def _run_cxr(models: ModelSet, path: Path, out_dir: Path) -> dict[str, Any]:
    """A chest X-ray (PNG/JPEG or DICOM CR/DX) through the infection-map model."""
    if not models.has("cxr"):
        raise InputError(path, "chest X-ray case but the cxr model is not installed or not selected")
    from monai_covid.infection_map import predict_cxr, read_xray

    try:
        image = read_xray(path)
    except (ValueError, OSError) as e:
        raise InputError(path, f"not a readable X-ray ({e})") from None
    size = tuple(models.config("cxr", "image_size", [256, 256]))
    threshold = float(models.config("cxr", "threshold", 0.5))
    det = models.cxr_detector()
    res = predict_cxr(models.net("cxr"), image, device=models.device, image_size=size, threshold=threshold, detector=det)
    atomic_save_png(out_dir / "infection_seg.png", res["seg"])
    atomic_save_png(out_dir / "infection_map.png", res["map"])
    return {
        "n_slices": 1,
        "shape_zyx": [1, *image.shape],
        "covid_probability": round(float(res["covid_probability"]), 4),
        "covid_detected": int(res["covid_detected"]),
        "covid_detector": det.rule,
        "covid_threshold": round(float(det.threshold), 4),
        "infected_area_percent": round(float(res["infected_area_percent"]), 3),
        "outputs": {"infection_seg": "infection_seg.png", "infection_map": "infection_map.png", "overlay": "infection_map.png"},
    }


def _run_job(job: Job, models: ModelSet, output: Path, args) -> dict[str, Any]:
    out_dir = output / job.case_id
    base = {"case_id": job.case_id, "source": display_text(job.case.rel), "version": RESULT_VERSION}
    t0 = time.perf_counter()
    modality = "cxr" if (job.case.kind == "image" and args.modality == "cxr") or job.case.modality == "cxr" else "ct"
    base["modality"] = modality
    try:
        if job.case.error:
            raise InputError(job.case.path, job.case.error)
        if job.case.kind == "image":
            record = process_image_case(job, models, out_dir, args.modality)
        elif modality == "cxr":
            record = _run_cxr(models, Path(job.case.series.files[0]), out_dir)
        else:
            if job.case.series is not None and job.case.series.modality not in ("CT", "OT", ""):
                raise InputError(job.case.path, f"modality {job.case.series.modality} is not CT; the CT models do not apply")
            record = process_ct_case(job, models, out_dir, write_seg=not args.no_dicom_seg)
        result = {**base, "status": "ok", "error": "", **record}
    except InputError as e:
        result = {**base, "status": "failed", "error": str(e)}
    except MemoryError:
        result = {**base, "status": "failed", "error": f"{display_text(job.case.path)}: out of memory"}
    except Exception as e:  # a bug or an unforeseen input must not stop the batch; keep the message to one line
        msg = display_text(" ".join(f"{type(e).__name__}: {e}".split()))[:300]
        result = {**base, "status": "failed", "error": f"{display_text(job.case.path)}: {msg}"}
        if os.environ.get("MONAI_COVID_DEBUG"):
            traceback.print_exc()
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["models"] = " ".join(models.names)
    result["model_signature"] = models.signature()
    if result["status"] == "ok":
        result["complete"] = True
        atomic_write_json(out_dir / "result.json", result)  # written last: marks the case complete
    return result


def _assign_ids(cases: list[Case]) -> list[Job]:
    """File-name-safe, unique output folder names; the batch's own file names and names differing only in case
    (one folder on a case-insensitive file system) get a suffix."""
    used: set[str] = set()
    jobs = []
    for c in cases:
        base = safe_name(c.rel)
        cid, i = base, 1
        while cid.casefold() in used or cid.casefold() in RESERVED_NAMES:
            i += 1
            cid = f"{base}_{i}"
        used.add(cid.casefold())
        jobs.append(Job(c, cid))
    return jobs


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return "; ".join(display_text(x) for x in v)
    if isinstance(v, (bool, int, float, np.integer, np.floating)):
        return v
    return display_text(v)


def _report_row(r: dict[str, Any]) -> dict[str, Any]:
    """One report row; a value that cannot be shown spoils only its own cell."""
    row = {}
    for k in REPORT_COLUMNS:
        try:
            row[k] = _fmt(r.get(k))
        except Exception as e:  # noqa: BLE001 - a report must never stop at one odd value
            row[k] = f"(value not shown: {type(e).__name__})"
    return row


def write_report(results: list[dict[str, Any]], output: Path) -> None:
    rows = [_report_row(r) for r in results]
    atomic_write_csv(output / "report.csv", rows, REPORT_COLUMNS, safe_cells=True)
    n_ok = sum(r.get("status") == "ok" for r in results)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in REPORT_COLUMNS if c != "models")
    body = []
    for r, row in zip(results, rows):
        cells = "".join(f"<td>{html.escape(str(row[c]))}</td>" for c in REPORT_COLUMNS if c != "models")
        img = ""
        overlay = (r.get("outputs") or {}).get("overlay")
        if r.get("status") == "ok" and overlay:
            src = html.escape(f"{row['case_id']}/{overlay}")
            img = f'<tr><td colspan="{len(REPORT_COLUMNS) - 1}"><a href="{src}"><img src="{src}" style="max-width:1024px"></a></td></tr>'
        cls = "failed" if r.get("status") != "ok" else "warn" if r.get("warnings") else "ok"
        body.append(f'<tr class="{cls}">{cells}</tr>{img}')
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>monai-covid report</title>
<style>body{{font-family:sans-serif;margin:1em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 6px;font-size:13px}}
tr.failed td{{background:#fdd}} tr.warn td{{background:#ffc}} th{{background:#eee}}</style></head><body>
<h1>monai-covid report</h1>
<p>{n_ok} of {len(results)} cases succeeded. Models: {html.escape(display_text(results[0].get('models', '')) if results else '')}.
Red: lesions; green: lung outline. Yellow rows: read the <code>warnings</code> column before the numbers.
Research use only, not for diagnosis.</p>
<table><tr>{head}</tr>
{''.join(body)}
</table></body></html>
"""
    atomic_write_text(output / "report.html", page)


def write_skipped(skipped: list[tuple[str, str]], inp: Path, output: Path, quiet: bool = False) -> None:
    """``OUTPUT/skipped.csv`` (``path,reason``, paths relative to INPUT): the files under INPUT that are not cases
    (not DICOM, localizers, non-image objects, 2D images without ``--modality``); one summary line on stderr."""
    from collections import Counter

    def rel(p: str) -> str:
        return display_text(os.path.relpath(p, inp) if inp.is_dir() else Path(p).name)

    rows = [{"path": rel(p), "reason": display_text(why)} for p, why in skipped]
    atomic_write_csv(output / "skipped.csv", rows, ["path", "reason"], safe_cells=True)
    if rows and not quiet:
        kinds = Counter(r["reason"].split(":")[0].split(" (")[0] for r in rows)
        summary = ", ".join(f"{n} {k}" for k, n in kinds.most_common())
        print(f"skipped {len(rows)} file(s) that are not cases ({summary}); list: "
              f"{display_text(output / 'skipped.csv')}", file=sys.stderr)


def _remove_staging_files(output: Path, case_ids: list[str]) -> None:
    """Delete temporary files a killed run left behind (the atomic writers' ``.<name>.*.part*`` staging files)."""
    for folder in [output, *(output / c for c in case_ids)]:
        if folder.is_dir():
            for p in folder.glob(".*.part*"):
                if p.is_file():
                    p.unlink(missing_ok=True)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during a batch (``signum`` says which); the CLI exits with 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def install_signal_handlers() -> dict[int, Any]:
    """SIGINT and SIGTERM raise :class:`Interrupted` (main thread only); returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, _raise_interrupted)
    return previous


def _dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def run_batch(args) -> int:
    from tqdm import tqdm

    from monai_covid.cli import EXIT_FAILED, EXIT_OK, UsageError, _check_output_outside_input

    inp, output = Path(args.input), Path(args.output)
    if not inp.exists():
        raise UsageError(f"{display_text(inp)}: no such file or folder")
    _check_output_outside_input(inp, output)
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    try:
        models = ModelSet(args.models, device=args.device, batch_size=args.batch_size)
    except ValueError as e:
        raise UsageError(str(e)) from None
    rank, world = _dist_info()
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")
    skipped: list[tuple[str, str]] = []
    cases = find_cases(inp, include_images=args.modality is not None, skipped=skipped)
    if inp.is_file() and not cases:
        raise UsageError(f"{display_text(inp)}: not a NIfTI file, DICOM series or image")
    jobs = _assign_ids(cases)
    mine = jobs[rank::world]
    output.mkdir(parents=True, exist_ok=True)
    _remove_staging_files(output, [j.case_id for j in mine])
    results: list[dict[str, Any]] = []
    bar = tqdm(mine, desc="infer", unit="case", disable=args.quiet, file=sys.stderr)
    try:
        for job in bar:
            bar.set_postfix_str(job.case_id[:30])
            previous = None if args.overwrite else _load_result(output / job.case_id, models.signature())
            if previous is not None:
                results.append(previous)
                continue
            result = _run_job(job, models, output, args)
            results.append(result)
            if result["status"] != "ok" and not args.quiet:
                tqdm.write(f"failed: {result['error']}", file=sys.stderr)
            if world == 1:
                write_report(results, output)  # keep a usable report even if the run is killed
    except KeyboardInterrupt:
        # a second signal must not interrupt the clean-up: the staging files of the case in progress go, the
        # finished cases stay complete (a rerun skips them and resumes with the rest)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
        bar.close()
        _remove_staging_files(output, [j.case_id for j in mine])
        raise
    if world > 1:
        import torch.distributed as dist

        gathered: list[list[dict[str, Any]]] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
        order = {j.case_id: i for i, j in enumerate(jobs)}
        results.sort(key=lambda r: order.get(r["case_id"], 0))
        dist.barrier()
    if rank == 0:
        write_report(results, output)
        write_skipped(skipped, inp, output, quiet=args.quiet)
        n_failed = sum(r["status"] != "ok" for r in results)
        if not args.quiet:
            for r in results:
                for w in r.get("warnings") or []:
                    print(f"note: {r['case_id']}: {display_text(w)}")
            total = sum(float(r.get("seconds") or 0) for r in results)
            print(f"{len(results) - n_failed} of {len(results)} cases ok, {n_failed} failed, {total:.1f} s; "
                  f"report: {display_text(output / 'report.html')} ({display_text(output / 'report.csv')})")
    else:
        n_failed = sum(r["status"] != "ok" for r in results)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if not results and rank == 0 and not args.quiet:
        print(f"no cases found under {display_text(inp)}", file=sys.stderr)
    return EXIT_OK if n_failed == 0 else EXIT_FAILED
