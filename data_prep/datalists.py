"""MONAI-style datalists for the data sets in ``../shared/data``, with deterministic k-fold splits.

Each builder returns a list of dicts (``image``, the label key(s), ``fold``); :func:`write_datalist` stores them as a
MONAI datalist JSON (``{"training": [...], "numFolds": k}``), readable by ``monai.data.load_decathlon_datalist``.

Grouping, so that slices of one patient stay in one fold where the data say which patient a slice is from:

- ``ct_dicom``: one series = one patient, each series is its own group.
- ``ct_lesion_slices`` (MedSeg/COVID-SemiSeg): no patient ids are published, but the numeric ids were assigned
  patient by patient, so folds are *contiguous blocks of sorted ids*, which keeps neighbouring slices (likely the
  same patient) together instead of scattering them over folds.
- ``ct_lesion_pseudo`` (the 1,600 pseudo-labelled COVID-SemiSeg slices): the file names carry the CT volume
  (:func:`pseudo_label_volume`) and so the patient (:func:`pseudo_label_patient`; two Radiopaedia cases have two
  series each). A fixed set of patients (:data:`PSEUDO_HOLDOUT_PATIENTS`) is held out of pre-training as the
  ``"val"`` part; these slices never enter a doctor-slice fold.
- ``cxr_infection`` and ``ct_slices_cls``: no patient ids exist; folds are stratified by class and assigned in a
  fixed order. Slices of one patient may therefore fall into different folds (stated in the bundle docs).
  ``ct_slices_cls_grouped`` groups near-duplicate slices (``data_prep.near_duplicates``) and keeps each group in
  one fold; ``ct_slices_ucsd`` (external test set) carries patient ids as ``group``. ``cxr_infection_grouped``
  does the same for the 3,060 X-rays (threshold :data:`CXR_NCC_THRESHOLD`, chosen in the infection-map bundle docs).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ct_lesion_datalist",
    "ct_lesion_pseudo_datalist",
    "pseudo_label_volume",
    "pseudo_label_patient",
    "PSEUDO_HOLDOUT_PATIENTS",
    "cxr_infection_datalist",
    "cxr_infection_grouped_datalist",
    "CXR_NCC_THRESHOLD",
    "ct_slices_cls_datalist",
    "ct_slices_cls_grouped_datalist",
    "ct_slices_ucsd_datalist",
    "ct_dicom_datalist",
    "ct_slices_extra_datalist",
    "ct_lesion_negatives_datalist",
    "CT_DISPLAY_WINDOW",
    "split_by_fold",
    "oversample",
    "write_datalist",
    "make_datalist",
]

_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _stable_order(paths: Sequence[Path]) -> list[Path]:
    """An order that depends only on file names (not on the file system), shuffled by a fixed hash."""
    return sorted(paths, key=lambda p: hashlib.sha1(p.name.encode()).hexdigest())


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder not found")
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_EXT), key=lambda p: _natural_key(p.name))


def _contiguous_folds(n: int, n_folds: int) -> list[int]:
    """Fold of each of ``n`` sorted items when cut into ``n_folds`` contiguous blocks of near-equal size."""
    return [min(i * n_folds // n, n_folds - 1) for i in range(n)]


def ct_lesion_datalist(data_dir: str | os.PathLike, n_folds: int = 5) -> list[dict[str, Any]]:
    """CT lesion slices (``ct_lesion_slices/train``): image jpg, binary mask png (0/255), multiclass mask png."""
    root = Path(data_dir) / "ct_lesion_slices" / "train"
    images = _images(root / "images")
    folds = _contiguous_folds(len(images), n_folds)
    items = []
    for img, fold in zip(images, folds):
        label = root / "masks" / f"{img.stem}.png"
        if not label.is_file():
            raise FileNotFoundError(f"{label}: mask missing for {img.name}")
        items.append(
            {
                "image": str(img),
                "label": str(label),
                "label_multiclass": str(root / "masks_multiclass" / f"{img.stem}.png"),
                "fold": fold,
                "group": f"block{fold}",
            }
        )
    return items


#: patients of the pseudo-labelled set held out of pre-training (2 coronacases.org, 2 Radiopaedia; 289 slices):
#: chosen by id before any training, mid-sized volumes of both sources
PSEUDO_HOLDOUT_PATIENTS: tuple[str, ...] = (
    "coronacases_003",
    "coronacases_007",
    "radiopaedia_14",
    "radiopaedia_40",
)

_PSEUDO_NAME = re.compile(r"^(?P<volume>.+)_(?P<slice>\d+)$")


def pseudo_label_volume(name: str) -> str:
    """CT volume (series) of a pseudo-labelled slice: its file stem without the trailing ``_<slice>``.

    ``"Data-1_coronacases_org_001_10.jpg"`` -> ``"Data-1_coronacases_org_001"``.
    """
    m = _PSEUDO_NAME.match(Path(name).stem)
    if m is None:
        raise ValueError(f"{name}: not a pseudo-label slice name (<volume>_<slice number>)")
    return m.group("volume")


def pseudo_label_patient(name: str) -> str:
    """Patient of a pseudo-labelled slice: ``coronacases_<NNN>`` or ``radiopaedia_<case>`` (Radiopaedia case 10 and
    case 29 have two series each; both series of a case are one patient)."""
    volume = pseudo_label_volume(name)
    m = re.search(r"coronacases_org_(\d+)$", volume)
    if m:
        return f"coronacases_{m.group(1)}"
    m = re.search(r"radiopaedia_org_.*?pneumonia-(\d+)_", volume)
    if m:
        return f"radiopaedia_{m.group(1)}"
    raise ValueError(f"{name}: unknown source in volume id {volume!r} (expected coronacases or radiopaedia)")


def ct_lesion_pseudo_datalist(
    data_dir: str | os.PathLike, holdout_patients: Sequence[str] = PSEUDO_HOLDOUT_PATIENTS, rewindow: bool = False
) -> list[dict[str, Any]]:
    """Pseudo-labelled CT lesion slices (``ct_lesion_slices/pseudo_labelled``): image jpg, ``label`` the soft mask
    png (probability x 255), ``volume`` and ``group`` (patient) ids, ``holdout`` (patient in ``holdout_patients``).
    ``rewindow=True`` adds ``grey_map`` (scale, offset) per volume (:func:`data_prep.lesion_slices.volume_grey_maps`),
    which ``GreyLevelMapd`` in the lesion bundles' ``load_transforms`` applies.
    """
    root = Path(data_dir) / "ct_lesion_slices" / "pseudo_labelled"
    holdout = set(holdout_patients)
    items = []
    for img in _images(root / "images"):
        label = root / "soft_masks" / f"{img.stem}.png"
        if not label.is_file():
            raise FileNotFoundError(f"{label}: soft mask missing for {img.name}")
        patient = pseudo_label_patient(img.name)
        items.append(
            {
                "image": str(img),
                "label": str(label),
                "volume": pseudo_label_volume(img.name),
                "group": patient,
                "holdout": patient in holdout,
            }
        )
    unknown = holdout - {d["group"] for d in items}
    if unknown:
        raise ValueError(f"{root}: held-out patients {sorted(unknown)} not in the data")
    if rewindow:
        from data_prep.lesion_slices import volume_grey_maps

        maps = volume_grey_maps(items, data_dir)
        for d in items:
            d["grey_map"] = list(maps[d["volume"]])
    return items


def _stratified(items_by_class: dict[Any, list[dict[str, Any]]], n_folds: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for _, items in sorted(items_by_class.items(), key=lambda kv: str(kv[0])):
        ordered = sorted(items, key=lambda d: hashlib.sha1(Path(d["image"]).name.encode()).hexdigest())
        for i, d in enumerate(ordered):
            d["fold"] = i % n_folds
            out.append(d)
    return sorted(out, key=lambda d: (d["fold"], d["image"]))


def cxr_infection_datalist(data_dir: str | os.PathLike, n_folds: int = 5) -> list[dict[str, Any]]:
    """Chest X-rays (``cxr_infection/train``): image, infection mask, lung mask, class name, ``covid`` 0/1."""
    root = Path(data_dir) / "cxr_infection" / "train"
    by_class: dict[str, list[dict[str, Any]]] = {}
    for cls in ("covid", "non_covid", "normal"):
        for img in _images(root / cls / "images"):
            by_class.setdefault(cls, []).append(
                {
                    "image": str(img),
                    "label": str(root / cls / "infection_masks" / img.name),
                    "lung": str(root / cls / "lung_masks" / img.name),
                    "class_name": cls,
                    "covid": int(cls == "covid"),
                }
            )
    return _stratified(by_class, n_folds)


def ct_slices_cls_datalist(data_dir: str | os.PathLike, n_folds: int = 5) -> list[dict[str, Any]]:
    """CT slice classification (``ct_slices_cls``): image png and ``label`` 1 = COVID, 0 = non-COVID."""
    root = Path(data_dir) / "ct_slices_cls"
    by_class = {
        label: [{"image": str(p), "label": label} for p in _images(root / name)]
        for name, label in (("covid", 1), ("non_covid", 0))
    }
    return _stratified(by_class, n_folds)


def ct_slices_cls_grouped_datalist(
    data_dir: str | os.PathLike, n_folds: int = 5, threshold: float | None = None
) -> list[dict[str, Any]]:
    """``ct_slices_cls`` with near-duplicate ``group`` ids and grouped folds (no group in two folds).

    The set has no patient ids: slices whose 64x64 thumbnails correlate at ``threshold`` or more (default
    :data:`data_prep.near_duplicates.DEFAULT_NCC_THRESHOLD`) are joined, transitively, into one group; folds are
    balanced by class (:func:`data_prep.near_duplicates.grouped_folds`).
    """
    from data_prep import near_duplicates as nd

    items = sorted(ct_slices_cls_datalist(data_dir, n_folds=n_folds), key=lambda d: _natural_key(Path(d["image"]).name))
    scores = nd.ncc_matrix(nd.thumbnails([d["image"] for d in items]))
    groups = nd.group_near_duplicates(scores, nd.DEFAULT_NCC_THRESHOLD if threshold is None else threshold)
    folds = nd.grouped_folds(groups, [d["label"] for d in items], n_folds=n_folds)
    for d, g, f in zip(items, groups, folds):
        d["group"], d["fold"] = f"g{g:03d}", f
    return sorted(items, key=lambda d: (d["fold"], d["image"]))


#: NCC of 64x64 thumbnails at or above which two training X-rays of ``cxr_infection`` join one group. Chosen from the
#: pair scores of the 3,060 X-rays (bundles/covid_cxr_infection_map_unet/docs/README.md, "v3 plan"): 20 of 2.25 M
#: COVID-vs-other pairs (different patients) reach 0.93 against 120 of 1.67 M COVID-COVID pairs; lower thresholds
#: chain unrelated X-rays into one group (largest group 102 at 0.92, 528 at 0.90; 38 at 0.93).
CXR_NCC_THRESHOLD = 0.93


@functools.lru_cache(maxsize=4)
def _cxr_groups_and_folds(root: str, names: tuple[str, ...], classes: tuple[str, ...], n_folds: int, threshold: float):
    from data_prep import near_duplicates as nd

    scores = nd.ncc_matrix(nd.thumbnails([os.path.join(root, c, "images", n) for c, n in zip(classes, names)]))
    groups = nd.group_near_duplicates(scores, threshold)
    return tuple(groups), tuple(nd.grouped_folds(groups, list(classes), n_folds=n_folds))


def cxr_infection_grouped_datalist(
    data_dir: str | os.PathLike, n_folds: int = 5, threshold: float | None = None
) -> list[dict[str, Any]]:
    """``cxr_infection`` with near-duplicate ``group`` ids and grouped folds (no group in two folds).

    The set has no patient ids: X-rays whose 64x64 thumbnails correlate at ``threshold`` or more (default
    :data:`CXR_NCC_THRESHOLD`) join one group, transitively; folds are balanced over the three classes
    (:func:`data_prep.near_duplicates.grouped_folds`). Deterministic (depends on file names and pixels only);
    ~15 s for the 3,060 X-rays on one CPU thread, cached per process.
    """
    items = sorted(
        cxr_infection_datalist(data_dir, n_folds=n_folds),
        key=lambda d: (d["class_name"], _natural_key(Path(d["image"]).name)),
    )
    root = str(Path(data_dir) / "cxr_infection" / "train")
    groups, folds = _cxr_groups_and_folds(
        root,
        tuple(Path(d["image"]).name for d in items),
        tuple(d["class_name"] for d in items),
        n_folds,
        CXR_NCC_THRESHOLD if threshold is None else float(threshold),
    )
    for d, g, f in zip(items, groups, folds):
        d["group"], d["fold"] = f"g{g:04d}", f
    return sorted(items, key=lambda d: (d["fold"], d["image"]))


def ct_slices_ucsd_datalist(data_dir: str | os.PathLike, split: str = "val") -> list[dict[str, Any]]:
    """UCSD COVID-CT (``ct_slices_ucsd``, external test set): image, ``label`` 1 = COVID, ``group`` = patient id."""
    root = Path(data_dir) / "ct_slices_ucsd"
    with open(root / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == split]
    if not rows:
        raise FileNotFoundError(f"{root / 'labels.csv'}: no images of split {split!r}")
    return [
        {"image": str(root / r["file"]), "label": int(r["label"] == "covid"), "group": r["patient_id"], "fold": 0}
        for r in rows
    ]


def ct_dicom_datalist(data_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """DICOM CT series (``ct_dicom``): series folder, volume label, per-slice labels keyed by InstanceNumber.

    Each series is its own patient group and fold (``fold`` = index of the series).
    """
    root = Path(data_dir) / "ct_dicom"
    with open(root / "volume_labels.csv", newline="") as f:
        volume_labels = {r["series_id"]: r["label"] for r in csv.DictReader(f)}
    slice_labels: dict[str, dict[int, int]] = {}
    with open(root / "slice_labels.csv", newline="") as f:
        for r in csv.DictReader(f):
            slice_labels.setdefault(r["series_id"], {})[int(r["instance_number"])] = int(r["infection"])
    items = []
    for fold, (series_id, label) in enumerate(sorted(volume_labels.items())):
        items.append(
            {
                "image": str(root / series_id),
                "series_id": series_id,
                "label_name": label,
                "label": int(label == "COVID-19"),
                "slice_labels": slice_labels.get(series_id, {}),
                "fold": fold,
                "group": series_id,
            }
        )
    return items


#: lung window (HU) of the 8-bit renders of the ``ct_dicom`` series for the slice classifier: width 1500, level -600
CT_DISPLAY_WINDOW = (-1350.0, 150.0)


def _hu_to_png(hu: Any, window: tuple[float, float] | None, path: Path) -> None:
    """``hu`` clipped to ``window`` and scaled to 8 bits (``data_prep.intensity.HUWindow``, the scale that
    ``segment_volume`` feeds the network) and written to ``path`` atomically (temporary name, then rename).
    ``window=None`` writes ``hu`` as it is (an 8-bit array, e.g. an empty mask)."""
    import numpy as np
    from PIL import Image

    from data_prep.intensity import HUWindow

    arr = np.asarray(hu) if window is None else np.round(HUWindow(*window)(np.asarray(hu, np.float32)) * 255.0)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.png")
    Image.fromarray(arr.astype(np.uint8)).save(tmp)
    os.replace(tmp, path)


def _render_series(series_dir: Path, out_dir: Path, window: tuple[float, float]) -> dict[int, Path]:
    """Every slice of one DICOM series as an 8-bit PNG ``out_dir/<instance>.png`` (HU clipped to ``window``); files
    already there are reused, new ones written atomically (temporary name, then rename). ``{instance number: png}``."""
    from data_prep.io import read_dicom_series

    out_dir.mkdir(parents=True, exist_ok=True)
    out: dict[int, Path] = {}
    done = {int(p.stem): p for p in out_dir.glob("*.png") if p.stem.isdigit()}
    n_expected = len([p for p in series_dir.iterdir() if p.is_file() and p.suffix.lower() == ".dcm"])
    if len(done) >= n_expected > 0:
        return done
    vol = read_dicom_series(series_dir)
    for z, inst in enumerate(vol.instance_numbers):
        path = out_dir / f"{int(inst)}.png"
        _hu_to_png(vol.array[z], window, path)
        out[int(inst)] = path
    return out


def ct_slices_extra_datalist(
    data_dir: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    pseudo_per_volume: int = 4,
    window: tuple[float, float] = CT_DISPLAY_WINDOW,
) -> list[dict[str, Any]]:
    """A second training source for the COVID/non-COVID CT slice classifier (issue 20), never a validation item.

    - COVID-19 (``label`` 1): the 50 doctor-labelled MedSeg slices (``ct_lesion_slices/train``), ``pseudo_per_volume``
      evenly spaced slices of each of the 20 pseudo-labelled COVID-19 volumes (every one holds a lesion), and the
      ``ct_dicom`` P001 slices with infection in ``slice_labels.csv``;
    - non-COVID (``label`` 0): the P001 slices without infection and every slice of the normal series normal001.

    The DICOM slices are rendered once to 8-bit PNG in ``window`` (HU) under ``cache_dir`` (default: the system
    temporary folder; never inside ``data_dir``). ``group``: the volume (``ctmd:P001``, ``pseudo:<volume>``) or the
    MedSeg slice (``medseg:<stem>``); ``fold`` -1 (training only). The keys are those of
    :func:`ct_slices_cls_grouped_datalist`, so that the two lists batch together.
    """
    import tempfile

    root = Path(data_dir)
    items: list[dict[str, Any]] = []
    for img in _images(root / "ct_lesion_slices" / "train" / "images"):
        items.append({"image": str(img), "label": 1, "group": f"medseg:{img.stem}", "fold": -1})
    by_volume: dict[str, list[Path]] = {}
    for img in _images(root / "ct_lesion_slices" / "pseudo_labelled" / "images"):
        by_volume.setdefault(pseudo_label_volume(img.name), []).append(img)
    for volume, imgs in sorted(by_volume.items()):
        imgs = sorted(imgs, key=lambda p: int(_PSEUDO_NAME.match(p.stem).group("slice")))
        k = min(pseudo_per_volume, len(imgs))
        for i in range(k):
            img = imgs[(2 * i + 1) * len(imgs) // (2 * k)]
            items.append({"image": str(img), "label": 1, "group": f"pseudo:{volume}", "fold": -1})
    cache = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "monai_covid_ct_slices_extra"
    lo, hi = window
    for d in ct_dicom_datalist(root):
        pngs = _render_series(Path(d["image"]), cache / f"{d['series_id']}_{lo:g}_{hi:g}", window)
        for inst, png in sorted(pngs.items()):
            label = int(d["slice_labels"].get(inst, 0)) if d["label"] else 0
            items.append({"image": str(png), "label": label, "group": f"ctmd:{d['series_id']}", "fold": -1})
    return items


def ct_lesion_negatives_datalist(
    data_dir: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    series: Sequence[str] = ("P001",),
    every: int = 2,
) -> list[dict[str, Any]]:
    """Lesion-free CT slices in the form the lesion models see a HU volume at inference, with empty masks (issue 18:
    negatives for the CT lesion bundles, ``"negatives": true`` in their ``train.json``; never a validation item).

    The slices of the ``ct_dicom`` ``series`` that ``slice_labels.csv`` marks as without infection (a radiologist's
    slice label), every ``every``-th of them (neighbours are near-identical), rendered as
    :func:`monai_covid.inference.lesion.segment_volume` feeds a volume to the network: cropped in-plane to the
    series' lung box (``data_prep.lung.lung_mask``, ``lung_bbox``) and windowed with ``HU_WINDOW`` to 8 bits. Written
    once as PNG (slice and an all-zero mask, atomically) under ``cache_dir`` (default: the system temporary folder;
    never inside ``data_dir``). The default is P001's lesion-free slices only: normal001, the normal series, stays
    held out, since "normal001 near 0 mL" is the check of a lesion model on HU input.

    Items: ``image``, ``label`` (mask png), ``series_id``, ``instance``.
    """
    import tempfile

    import numpy as np

    from data_prep.io import read_dicom_series
    from data_prep.lung import lung_mask
    from monai_covid.inference.lesion import HU_WINDOW, lung_bbox

    root = Path(data_dir)
    cache = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "monai_covid_ct_lesion_negatives"
    lo, hi = HU_WINDOW
    wanted = set(series)
    items: list[dict[str, Any]] = []
    for d in ct_dicom_datalist(root):
        if d["series_id"] not in wanted:
            continue
        free = sorted(inst for inst, infected in d["slice_labels"].items() if not infected)[:: max(int(every), 1)]
        if not free:
            continue
        out_dir = cache / f"{d['series_id']}_{lo:g}_{hi:g}_every{int(every)}"
        paths = {inst: (out_dir / f"{inst}.png", out_dir / f"{inst}_mask.png") for inst in free}
        if not all(img.is_file() and msk.is_file() for img, msk in paths.values()):
            out_dir.mkdir(parents=True, exist_ok=True)
            vol = read_dicom_series(Path(d["image"]))
            box = lung_bbox(lung_mask(vol.array, vol.spacing))
            ys, xs = box if box is not None else (slice(None), slice(None))
            index = {int(inst): z for z, inst in enumerate(vol.instance_numbers)}
            for inst, (img_path, msk_path) in paths.items():
                hu = vol.array[index[inst]][ys, xs]
                _hu_to_png(hu, (lo, hi), img_path)
                _hu_to_png(np.zeros(hu.shape, np.uint8), None, msk_path)
        for inst, (img_path, msk_path) in paths.items():
            items.append(
                {"image": str(img_path), "label": str(msk_path), "series_id": d["series_id"], "instance": inst}
            )
    return items


def split_by_fold(items: Sequence[dict[str, Any]], fold: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training items, validation items) for cross-validation fold ``fold``."""
    folds = {d["fold"] for d in items}
    if fold not in folds:
        raise ValueError(f"fold {fold} not in {sorted(folds)}")
    return [d for d in items if d["fold"] != fold], [d for d in items if d["fold"] == fold]


def oversample(items: Sequence[dict[str, Any]], key: str, repeats: dict[Any, int]) -> list[dict[str, Any]]:
    """Each item repeated ``repeats[item[key]]`` times (default 1), order kept: class balancing for one epoch.

    ``oversample(items, "class_name", {"non_covid": 3})`` shows every non-COVID X-ray three times an epoch.
    """
    bad = {k: n for k, n in repeats.items() if int(n) != n or n < 0}
    if bad:
        raise ValueError(f"repeats must be whole numbers >= 0, got {bad}")
    return [d for d in items for _ in range(int(repeats.get(d[key], 1)))]


_BUILDERS = {
    "ct_lesion_slices": ct_lesion_datalist,
    "cxr_infection": cxr_infection_datalist,
    "cxr_infection_grouped": cxr_infection_grouped_datalist,
    "ct_slices_cls": ct_slices_cls_datalist,
    "ct_slices_cls_grouped": ct_slices_cls_grouped_datalist,
}


def make_datalist(
    name: str,
    data_dir: str | os.PathLike,
    fold: int | None = None,
    n_folds: int = 5,
    part: str = "train",
    rewindow: bool = False,
):
    """Config-friendly entry point: the items of data set ``name``, or one part of fold ``fold``.

    ``part`` is ``"train"``, ``"val"`` or ``"all"``; with ``fold=None`` all items are returned. ``"ct_lesion_pseudo"``
    has no folds: ``"train"`` / ``"val"`` are the pre-training and the held-out patients whatever ``fold`` is;
    ``rewindow`` (that set only) adds the per-volume grey-level map.
    """
    if name == "ct_lesion_pseudo":  # no folds: "train" = pre-training patients, "val" = held-out patients
        items = ct_lesion_pseudo_datalist(data_dir, rewindow=rewindow)
        if part not in ("train", "val", "all"):
            raise ValueError(f"part must be train, val or all, got {part!r}")
        return items if part == "all" else [d for d in items if d["holdout"] == (part == "val")]
    if name == "ct_dicom":
        items = ct_dicom_datalist(data_dir)
    elif name in _BUILDERS:
        items = _BUILDERS[name](data_dir, n_folds=n_folds)
    else:
        raise ValueError(
            f"unknown data set {name!r}; choose from {sorted([*_BUILDERS, 'ct_dicom', 'ct_lesion_pseudo'])}"
        )
    if fold is None or part == "all":
        return items
    train, val = split_by_fold(items, fold)
    return {"train": train, "val": val}[part]


def write_datalist(items: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write a MONAI datalist JSON (``training`` list with ``fold`` keys) atomically."""
    from monai_covid.io_utils import atomic_write_json

    n_folds = len({d["fold"] for d in items})
    return atomic_write_json(path, {"numFolds": n_folds, "training": list(items)})


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m data_prep.datalists", description="Write a MONAI datalist JSON.")
    p.add_argument("name", choices=sorted([*_BUILDERS, "ct_dicom"]))
    p.add_argument("data_dir", help="folder holding the shared data sets (e.g. ../shared/data)")
    p.add_argument("output", help="datalist JSON to write")
    p.add_argument("--folds", type=int, default=5)
    a = p.parse_args(argv)
    items = make_datalist(a.name, a.data_dir, n_folds=a.folds)
    write_datalist(items, a.output)
    print(f"{a.output}: {len(items)} items, {len({d['fold'] for d in items})} folds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
