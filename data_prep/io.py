"""DICOM and NIfTI input/output for CT volumes.

What MONAI's ``LoadImage`` (ITKReader / PydicomReader) does not do, and this module adds:

- discovery of every DICOM series under a folder tree, grouped by ``SeriesInstanceUID`` (a folder may hold
  several series, a series may span folders), skipping non-image objects (SR, SEG, RTSTRUCT, ...) and localizers;
- validation before decoding: consistent orientation and matrix, no duplicated or missing slices, even spacing;
  every problem raises :class:`InputError` with a one-line message naming the file or folder;
- the slice order and geometry of SimpleITK's ``ImageSeriesReader`` (slices sorted by position along the slice
  normal, ascending), so that a NIfTI written here is voxel- and geometry-identical to SimpleITK's reading;
- the per-slice identifiers (InstanceNumber, SOPInstanceUID, headers) that DICOM SEG and slice reports need.

Pixel data are decoded once, by SimpleITK/GDCM (which reads JPEG-Lossless natively and applies
RescaleSlope/RescaleIntercept to give HU). Arrays are ``(z, y, x)`` (SimpleITK's ``GetArrayFromImage`` order).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from monai_covid.io_utils import _utf8_encodable, display_text

__all__ = [
    "InputError",
    "Volume",
    "DicomSeries",
    "Case",
    "find_dicom_series",
    "read_dicom_series",
    "read_nifti",
    "read_volume",
    "write_like",
    "find_cases",
    "safe_name",
    "NIFTI_SUFFIXES",
    "IMAGE_SUFFIXES",
    "MAX_DEPTH",
    "itk_readable",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Modalities that hold no image pixels we could segment.
_NON_IMAGE_MODALITIES = {"SR", "SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "PR", "KO", "REG", "DOC", "AU", "ECG", "OT"}
_IMAGE_STORAGE_PREFIXES = ("1.2.840.10008.5.1.4.1.1.",)
_NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
}


class InputError(ValueError):
    """A bad input: the message is one line and names the offending file or folder.

    ``path`` is the path as the OS gave it (may hold surrogate-escaped bytes; use it to open the file); the message
    shows it through :func:`~monai_covid.io_utils.display_text` (control characters and non-UTF-8 bytes escaped).
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fsdecode(path)
        self.reason = display_text(" ".join(str(reason).split()))
        super().__init__(f"{display_text(self.path)}: {self.reason}")


@dataclass
class Volume:
    """A CT volume in HU with the geometry of its source.

    ``array``: float32 HU, shape ``(z, y, x)``. ``image``: a SimpleITK image carrying the geometry (spacing, origin,
    direction); ``write_like`` copies it. For DICOM input, the per-slice lists follow ``array``'s z order.
    """

    array: np.ndarray
    image: sitk.Image
    source: str
    kind: str  # "dicom" or "nifti"
    files: list[str] = field(default_factory=list)
    instance_numbers: list[int] = field(default_factory=list)
    sop_instance_uids: list[str] = field(default_factory=list)
    headers: list = field(default_factory=list)  # pydicom Datasets without pixel data, DICOM only
    modality: str = "CT"

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm, ``(z, y, x)`` like ``array``."""
        sx, sy, sz = self.image.GetSpacing()
        return (sz, sy, sx)

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.image.GetSpacing())) / 1000.0

    @property
    def n_slices(self) -> int:
        return int(self.array.shape[0])


@dataclass
class DicomSeries:
    """One DICOM image series found on disk (headers read, pixels not decoded)."""

    series_uid: str
    files: list[str]
    headers: list
    modality: str
    folder: str  # common folder of the files

    @property
    def is_2d(self) -> bool:
        return self.modality in ("CR", "DX", "MG", "XA", "RF") or len(self.files) == 1 and self.modality != "CT"


@dataclass
class Case:
    """An input case found by :func:`find_cases`: a DICOM series, a NIfTI file or a 2D image."""

    kind: str  # "dicom", "nifti" or "image"
    path: str  # series folder, NIfTI or image file
    rel: str  # path relative to the search root, used to name outputs
    series: DicomSeries | None = None
    error: str | None = None  # discovery problem (e.g. unreadable file), reported per case

    @property
    def modality(self) -> str:
        if self.series is not None:
            return "cxr" if self.series.is_2d else "ct"
        return "ct" if self.kind == "nifti" else "image"


def safe_name(rel: str, fallback: str = "case") -> str:
    """A file-name-safe case name from a relative path: no separators, no ``..``, ASCII word characters."""
    name = str(rel).replace("\\", "/")
    for suffix in (".nii.gz", ".nii", ".dcm", *IMAGE_SUFFIXES):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    parts = [p for p in name.split("/") if p not in ("", ".", "..")]
    name = "_".join(parts)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    name = re.sub(r"\.{2,}", "_", name)
    return name[:120] or fallback


#: Folders nested deeper than this below the search root are not searched (and are listed as skipped).
MAX_DEPTH = 128
try:
    PATH_MAX = int(os.pathconf("/", "PC_PATH_MAX"))
except (AttributeError, OSError, ValueError):
    PATH_MAX = 4096


def _os_reason(e: OSError) -> str:
    """Why the OS refused an entry, in words for ``skipped.csv``."""
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno == errno.ENAMETOOLONG:
        return f"path longer than PATH_MAX ({PATH_MAX} bytes): not reachable by name"
    if e.errno == errno.ELOOP:
        return "symbolic link loop"
    return f"not readable ({e.strerror or type(e).__name__})"


def _walk_files(root: Path, skipped: list[tuple[str, str]] | None = None) -> Iterator[Path]:
    """Regular files under ``root``, folder by folder in sorted order (hidden entries ignored).

    Any name the OS allows is walked: names are ``str`` with undecodable bytes surrogate-escaped, which Python's
    file functions map back to the same bytes. Symlinked folders are not followed (a link loop cannot trap the
    walk); the walk is iterative (no recursion limit). What it cannot reach goes to ``skipped`` with the reason:
    folders it may not list, paths longer than PATH_MAX, folders more than :data:`MAX_DEPTH` levels down, broken
    links, links to folders, device files, FIFOs and sockets.
    """

    def skip(path: str, why: str) -> None:
        if skipped is not None:
            skipped.append((path, why))

    if root.is_file():
        yield root
        return
    stack: list[tuple[str, int]] = [(str(root), 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            skip(folder, f"folder {_os_reason(e)}")
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = entry.path
            if len(os.fsencode(os.path.abspath(path))) >= PATH_MAX:
                skip(path, f"path longer than PATH_MAX ({PATH_MAX} bytes): not reachable by name")
                continue
            try:
                if entry.is_symlink():
                    if os.path.isdir(path):
                        skip(path, "symbolic link to a folder: not followed")
                        continue
                    if not os.path.exists(path):
                        skip(path, "broken symbolic link (or a link loop)")
                        continue
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(path)
                elif entry.is_file():
                    yield Path(path)
                else:
                    skip(path, "not a regular file (device, FIFO or socket)")
            except OSError as e:
                skip(path, _os_reason(e))
        for d in reversed(subdirs):
            if depth + 1 > MAX_DEPTH:
                skip(d, f"folder nested more than {MAX_DEPTH} levels below INPUT: not searched")
            else:
                stack.append((d, depth + 1))


@contextlib.contextmanager
def itk_readable(paths: Sequence[str]) -> Iterator[list[str]]:
    """The same files under names SimpleITK can open.

    SimpleITK takes file names as UTF-8 text, so a name whose bytes are not UTF-8 (a Latin-1 folder from an old
    Windows share; Python holds those bytes as surrogates) cannot be passed to it. Such a file is reached through a
    symbolic link with an ASCII name in a temporary folder (outside INPUT and OUTPUT), removed on exit; the other
    paths pass unchanged.
    """
    paths = [os.fsdecode(p) for p in paths]
    if all(_utf8_encodable(p) for p in paths):
        yield paths
        return
    with tempfile.TemporaryDirectory(prefix="monai-covid-names-") as scratch:
        out = []
        for i, p in enumerate(paths):
            if _utf8_encodable(p):
                out.append(p)
                continue
            low = p.lower()
            suffix = next((s for s in (".nii.gz", ".nii", ".dcm") if low.endswith(s)), "")
            alias = os.path.join(scratch, f"{i:06d}{suffix}")
            os.symlink(os.path.abspath(p), alias)
            out.append(alias)
        yield out


def _read_header(path: Path):
    """pydicom header without pixels, or None when the file is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if path.stat().st_size == 0:
        if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
            raise InputError(path, "empty file (0 bytes)")
        return None
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except InvalidDicomError:
        # files without the 128-byte preamble are still DICOM if they parse with force=True and have a SOP UID
        if path.suffix.lower() not in (".dcm", ".dicom", ".ima", ""):
            return None
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
        except Exception:
            return None
        return ds if "SOPClassUID" in ds or "SeriesInstanceUID" in ds else None
    except PermissionError:
        raise
    except Exception as e:  # truncated header, unreadable file
        raise InputError(path, f"unreadable DICOM header ({type(e).__name__}: {e})") from None


def _is_image(ds) -> bool:
    modality = str(ds.get("Modality", "")).upper()
    sop = str(ds.get("SOPClassUID", ""))
    if modality in _NON_IMAGE_MODALITIES or sop in _NON_IMAGE_SOP_CLASSES:
        return False
    if sop and not sop.startswith(_IMAGE_STORAGE_PREFIXES):
        return False
    return "Rows" in ds and "Columns" in ds


def _is_localizer(ds) -> bool:
    image_type = [str(t).upper() for t in (ds.get("ImageType") or [])]
    return "LOCALIZER" in image_type or "SCOUT" in image_type


def find_dicom_series(
    root: str | os.PathLike, skipped: list[tuple[str, str]] | None = None, files: Sequence[Path] | None = None
) -> tuple[list[DicomSeries], list[InputError]]:
    """All DICOM image series under ``root``, grouped by SeriesInstanceUID, and the files that failed.

    Non-DICOM files are ignored; non-image objects and localizers are skipped; unreadable DICOM files are
    returned as errors (attached by :func:`find_cases` to the series of their folder). ``skipped``, when given,
    receives ``(path, reason)`` for every file passed over (not DICOM, localizer, non-image object, permission
    denied, unreachable). ``files``: the walk of ``root`` when the caller already made it.
    """
    groups: dict[str, list[tuple[Path, object]]] = {}
    errors: list[InputError] = []
    for path in _walk_files(Path(root), skipped) if files is None else files:
        low = path.name.lower()
        if low.endswith((*NIFTI_SUFFIXES, *IMAGE_SUFFIXES)):
            continue  # cases of their own (find_cases)
        if low.endswith((".json", ".csv", ".txt", ".md")):
            if skipped is not None:
                skipped.append((str(path), f"not DICOM ({low.rsplit('.', 1)[-1]} file, not read)"))
            continue
        try:
            ds = _read_header(path)
        except InputError as e:
            errors.append(e)
            continue
        except OSError as e:  # permission denied, vanished while walking
            if skipped is not None:
                skipped.append((str(path), _os_reason(e)))
            continue
        if ds is None or not _is_image(ds) or _is_localizer(ds):
            if skipped is not None:
                why = ("not DICOM" if ds is None else "localizer" if _is_image(ds)
                       else f"non-image DICOM object ({str(ds.get('Modality', '')) or 'no modality'})")
                skipped.append((str(path), why))
            continue
        uid = str(ds.get("SeriesInstanceUID", "")) or f"no-series-uid:{path.parent}"
        groups.setdefault(uid, []).append((path, ds))
    # A series copied into two folders (an export made twice) is two cases, not one with duplicated slices;
    # a series spread over several folders without repeats stays one.
    split: dict[str, list[tuple[Path, object]]] = {}
    for uid, members in groups.items():
        sops = [str(ds.get("SOPInstanceUID", "")) for _, ds in members]
        if len(set(sops)) < len(sops):
            for p, ds in members:
                split.setdefault(f"{uid}@{p.parent}", []).append((p, ds))
        else:
            split[uid] = members
    series = []
    for uid, members in split.items():
        files = [str(p) for p, _ in members]
        folder = os.path.commonpath([str(p.parent) for p, _ in members])
        modality = str(members[0][1].get("Modality", "")).upper() or "OT"
        series.append(DicomSeries(uid, files, [ds for _, ds in members], modality, folder))
    series.sort(key=lambda s: (s.folder, s.files[0]))
    return series, errors


def _slice_geometry(series: DicomSeries) -> tuple[list[int], np.ndarray]:
    """Order of the slices along the normal (ascending, as GDCM sorts) and their positions; validates the series."""
    heads, files = series.headers, series.files
    first = heads[0]
    for key in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
        for ds, f in zip(heads, files):
            if key not in ds:
                raise InputError(f, f"missing {key}; cannot place the slice in space")
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    rows, cols = int(first.Rows), int(first.Columns)
    for ds, f in zip(heads, files):
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=float), iop, atol=1e-4):
            raise InputError(f, "slice orientation differs from the rest of the series (mixed or tilted series)")
        if int(ds.Rows) != rows or int(ds.Columns) != cols:
            raise InputError(f, f"matrix {ds.Rows}x{ds.Columns} differs from the series' {rows}x{cols}")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1 and len(files) > 1:
            raise InputError(f, "multi-frame object mixed with single-frame slices")
    if rows * cols * len(files) > MAX_VOXELS or rows > 8192 or cols > 8192:
        raise InputError(files[0], f"matrix {rows}x{cols} x {len(files)} slices is larger than this tool reads")
    normal = np.cross(iop[:3], iop[3:])
    pos = np.array([float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))) for ds in heads])
    order = list(np.argsort(pos, kind="stable"))
    if len(order) >= 2:
        p = pos[order]
        gaps = np.diff(p)
        dup = np.where(gaps < 1e-3)[0]
        if dup.size:
            raise InputError(files[order[dup[0] + 1]], f"duplicate slice position {p[dup[0]]:.2f} mm (two acquisitions in one series?)")
        step = float(np.median(gaps))
        bad = np.where(np.abs(gaps - step) > max(0.1 * step, 0.05))[0]
        if bad.size:
            i = int(bad[0])
            what = "missing slice(s)" if gaps[i] > 1.5 * step else "uneven slice spacing"
            raise InputError(
                series.folder,
                f"{what}: gap of {gaps[i]:.2f} mm between positions {p[i]:.2f} and {p[i + 1]:.2f} "
                f"(series step {step:.2f} mm)",
            )
    return order, pos


def read_dicom_series(series: DicomSeries | str | os.PathLike) -> Volume:
    """Decode one series into a :class:`Volume` in HU. A folder must hold exactly one image series."""
    if not isinstance(series, DicomSeries):
        folder = Path(series)
        if not folder.exists():
            raise InputError(folder, "no such file or folder")
        found, errors = find_dicom_series(folder)
        if errors:
            raise errors[0]
        if not found:
            raise InputError(folder, "no DICOM image series found")
        if len(found) > 1:
            raise InputError(folder, f"holds {len(found)} DICOM series; pass one series (or use find_dicom_series)")
        series = found[0]
    order, _ = _slice_geometry(series)
    files = [series.files[i] for i in order]
    headers = [series.headers[i] for i in order]
    with itk_readable(files) as names:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(names)
        try:
            image = reader.Execute()
        except RuntimeError:
            raise _find_undecodable(files, names) from None
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    if array.ndim != 3 or array.shape[0] != len(files):
        raise InputError(series.folder, f"decoded shape {array.shape} does not match {len(files)} slices")
    if not np.isfinite(array).all():
        raise InputError(series.folder, "decoded pixel data contain NaN or infinite values")
    return Volume(
        array=array,
        image=image,
        source=series.folder,
        kind="dicom",
        files=files,
        instance_numbers=[int(h.get("InstanceNumber", i + 1) or i + 1) for i, h in enumerate(headers)],
        sop_instance_uids=[str(h.get("SOPInstanceUID", "")) for h in headers],
        headers=headers,
        modality=series.modality,
    )


def _find_undecodable(files: Sequence[str], names: Sequence[str] | None = None) -> InputError:
    """Name the first file whose pixel data cannot be decoded (called only after the series reader failed);
    ``names``: the same files as SimpleITK can open them (:func:`itk_readable`)."""
    for f, name in zip(files, names or files):
        try:
            r = sitk.ImageFileReader()
            r.SetFileName(name)
            r.Execute()
        except RuntimeError:
            return InputError(f, "pixel data cannot be decoded (truncated file or unsupported transfer syntax)")
    return InputError(os.path.dirname(files[0]), "the series could not be decoded as one volume")


def read_nifti(path: str | os.PathLike) -> Volume:
    """Read a 3D NIfTI CT in HU. 4D images with a single time point are squeezed; anything else is rejected.

    The geometry is ITK's reading of the header (so outputs match what SimpleITK/ITK-based viewers show); the
    voxels are decoded once, by nibabel, which, unlike ITK, reports a truncated file and keeps NaN as NaN.
    """
    import nibabel as nib

    path = Path(path)
    _check_nifti_header(path)
    reader = sitk.ImageFileReader()
    with itk_readable([str(path)]) as (name,):
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
        except RuntimeError as e:
            raise InputError(path, f"not a readable NIfTI ({_itk_reason(e)})") from None
    size, dim = reader.GetSize(), reader.GetDimension()
    if dim == 4 and size[3] == 1:
        dim = 3
    if dim != 3:
        raise InputError(path, f"expected a 3D CT volume, got {reader.GetDimension()}D of size {size}")
    if reader.GetNumberOfComponents() != 1:
        raise InputError(path, "expected one intensity per voxel (got a vector image)")
    if min(size[:2]) < 16:
        raise InputError(path, f"image size {size} is too small for a CT volume")
    try:
        data = np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as e:
        raise InputError(path, f"voxel data cannot be read, file truncated or corrupt ({type(e).__name__})") from None
    data = data.reshape(data.shape[:3])
    n_bad = int(data.size - np.count_nonzero(np.isfinite(data))) if data.dtype.kind == "f" else 0
    if n_bad:
        raise InputError(path, f"{n_bad} voxels are NaN or infinite")
    array = np.ascontiguousarray(data.T, dtype=np.float32)  # nibabel (x, y, z) -> (z, y, x)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(reader.GetSpacing()[:3])
    image.SetOrigin(reader.GetOrigin()[:3])
    direction = np.asarray(reader.GetDirection()).reshape(reader.GetDimension(), reader.GetDimension())[:3, :3]
    image.SetDirection(direction.ravel().tolist())
    return Volume(array=array, image=image, source=str(path), kind="nifti")


def _itk_reason(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:160]


#: Refuse volumes above this many voxels before allocating them (a 1024 x 1024 x 2000 CT is 2.1e9).
MAX_VOXELS = 2_200_000_000


def _check_nifti_header(path: Path) -> None:
    """Reject a NIfTI whose header promises more voxels than is sane, before ITK tries to allocate them."""
    import nibabel as nib

    if path.stat().st_size == 0:
        raise InputError(path, "empty file")
    try:
        header = nib.load(str(path)).header
        shape = tuple(int(d) for d in header.get_data_shape())
    except Exception as e:
        raise InputError(path, f"not a readable NIfTI ({type(e).__name__})") from None
    if shape and int(np.prod(shape, dtype=np.float64)) > MAX_VOXELS:
        raise InputError(path, f"header declares {shape} voxels, more than this tool reads ({MAX_VOXELS:.1e})")


def read_volume(path: str | os.PathLike | DicomSeries) -> Volume:
    """A CT volume in HU from a NIfTI file, a DICOM series folder or a :class:`DicomSeries`."""
    if isinstance(path, DicomSeries):
        return read_dicom_series(path)
    p = Path(path)
    if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES):
        return read_nifti(p)
    if p.is_dir() or p.is_file():
        return read_dicom_series(p)
    raise InputError(p, "no such file or folder")


def write_like(array: np.ndarray, reference: Volume | sitk.Image, path: str | os.PathLike, dtype=None) -> Path:
    """Write ``array`` ``(z, y, x)`` as NIfTI with exactly the geometry of ``reference``, atomically."""
    from monai_covid.io_utils import atomic_save_with

    ref = reference.image if isinstance(reference, Volume) else reference
    arr = np.asarray(array)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    expected = tuple(reversed(ref.GetSize()))
    if arr.shape != expected:
        raise ValueError(f"array shape {arr.shape} does not match the reference (z, y, x) {expected}")
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(ref)
    return atomic_save_with(path, lambda tmp: sitk.WriteImage(img, tmp, useCompression=True))


def find_cases(
    root: str | os.PathLike, include_images: bool = False, skipped: list[tuple[str, str]] | None = None
) -> list[Case]:
    """Every case under ``root``: DICOM series (by SeriesInstanceUID), NIfTI files and, optionally, 2D images.

    Unreadable DICOM files are reported as failed cases of their own (``error`` set), so a batch can list them;
    files that are not cases go to ``skipped`` as ``(path, reason)`` when it is given.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(root, "no such file or folder")
    cases: list[Case] = []
    files = list(_walk_files(root, skipped))
    for p in files:
        name = p.name.lower()
        rel = str(p.relative_to(root)) if p != root else p.name
        if name.endswith((*NIFTI_SUFFIXES, *IMAGE_SUFFIXES)) and not os.access(p, os.R_OK):
            if skipped is not None:
                skipped.append((str(p), "permission denied"))
        elif name.endswith(NIFTI_SUFFIXES):
            cases.append(Case("nifti", str(p), rel))
        elif name.endswith(IMAGE_SUFFIXES):
            if include_images:
                cases.append(Case("image", str(p), rel))
            elif skipped is not None:
                skipped.append((str(p), "2D image: pass --modality ct or cxr to process it"))
    series, errors = find_dicom_series(root, skipped, files=files)
    used: set[str] = set()
    for s in series:
        rel_folder = os.path.relpath(s.folder, root) if root.is_dir() else Path(s.folder).name
        number = re.sub(r"[^0-9A-Za-z_-]", "", str(s.headers[0].get("SeriesNumber", "") or ""))[:16]
        label = f"series_{number or series.index(s) + 1}"
        if rel_folder == ".":
            rel_folder = label
        elif len([x for x in series if x.folder == s.folder]) > 1:
            rel_folder = f"{rel_folder}/{label}"
        rel, k = rel_folder, 2
        while rel in used:  # two series of one folder with the same SeriesNumber: series_4, series_4_2, ...
            rel, k = f"{rel_folder}_{k}", k + 1
        used.add(rel)
        cases.append(Case("dicom", s.folder, rel, series=s))
    for e in errors:
        rel = os.path.relpath(e.path, root) if root.is_dir() else Path(e.path).name
        cases.append(Case("dicom", e.path, rel, error=e.reason))
    cases.sort(key=lambda c: c.rel)
    return cases
