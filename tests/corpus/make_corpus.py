"""Generate a corpus of bad and odd inputs for ``monai-covid infer`` from the real sample series and synthetic data.

``python tests/corpus/make_corpus.py OUT [--sample samples/ct_dicom/P001_slices60-89]`` writes the corpus under OUT
and ``OUT/../corpus_expected.json`` listing, per case folder/file, what ``infer`` should do with it:
``"ok"``, ``"failed"`` or ``"skipped"`` (not a case: localizers, non-image objects, non-DICOM files, and what the
walk cannot reach). Keys are the top-level names as the report shows them (``display_text``: a Latin-1 byte as
``\\xe9``, a newline as ``\\n``).

Real-world names and dirty DICOM (issue 22): names that are not UTF-8, hold newlines, carriage returns or ANSI
escapes, start with a spreadsheet formula character or equal the batch's own report files; a series whose
SOPInstanceUIDs are empty and whose Study/Series UIDs are UUID text; patient/study tags with control characters;
a series below a path longer than PATH_MAX, a folder nested deeper than the walk goes, a FIFO, a broken link and
(when not run as root) a folder and a file without read permission.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid

from monai_covid.io_utils import display_text

N_SLICES = 5  # slices per synthetic series: enough for a volume, small enough to keep the test quick


def _series(sample: Path, dst: Path, n: int = N_SLICES, new_uid: bool = True) -> list[Path]:
    """Copy ``n`` contiguous slices of the sample into ``dst`` with a fresh SeriesInstanceUID (and SOP UIDs)."""
    dst.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    out = []
    for i, f in enumerate(sorted(sample.glob("*.dcm"))[10 : 10 + n]):
        target = dst / f"slice{i:03d}.dcm"
        if new_uid:
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID = uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(target)
        else:
            shutil.copyfile(f, target)
        out.append(target)
    return out


def _edit(path: Path, **attrs) -> None:
    """Set (``None``: delete) header attributes; invalid values are written as given (real files have them)."""
    from pydicom import config

    modes = config.settings.reading_validation_mode, config.settings.writing_validation_mode
    config.settings.reading_validation_mode = config.settings.writing_validation_mode = config.IGNORE
    try:
        ds = pydicom.dcmread(path)
        for k, v in attrs.items():
            if v is None:
                delattr(ds, k)
            else:
                setattr(ds, k, v)
        ds.save_as(path)
    finally:
        config.settings.reading_validation_mode, config.settings.writing_validation_mode = modes


def dirty_uid_series(sample: Path, dst: Path, n: int = N_SLICES, empty_sop: bool = True) -> list[Path]:
    """A series as some anonymisers export it: SOPInstanceUIDs empty, Study/Series UIDs as UUID text (not the
    dotted digits a DICOM UID must be)."""
    files = _series(sample, dst, n)
    study, series = str(uuid.uuid4()), str(uuid.uuid4())
    for f in files:
        attrs = {"StudyInstanceUID": study, "SeriesInstanceUID": series}
        if empty_sop:
            attrs["SOPInstanceUID"] = ""
        _edit(f, **attrs)
        if empty_sop:
            ds = pydicom.dcmread(f)
            ds.file_meta.MediaStorageSOPInstanceUID = ""
            ds.save_as(f)
    return files


def _mkdir_fd(parent_fd: int, name: bytes) -> int:
    os.mkdir(name, dir_fd=parent_fd)
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=parent_fd)


def make_long_path(base: Path, payload: Path, min_bytes: int = 4200) -> bytes:
    """Move the folder ``payload`` to below ``base`` at a path longer than ``min_bytes`` (more than PATH_MAX, so it
    cannot be opened by name); built with folder descriptors. Returns the path relative to ``base`` (bytes)."""
    base.mkdir(parents=True, exist_ok=True)
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    rel = b""
    try:
        i = 0
        while len(os.fsencode(base)) + len(rel) < min_bytes:
            name = b"%02d_" % i + b"x" * 200
            new = _mkdir_fd(fd, name)
            os.close(fd)
            fd, rel, i = new, rel + name + b"/", i + 1
        os.rename(payload, "series", dst_dir_fd=fd)
    finally:
        os.close(fd)
    return rel + b"series"


def _transcode(files: list[Path], syntax) -> None:
    for f in files:
        ds = pydicom.dcmread(f)
        if syntax == RLELossless:
            ds.compress(RLELossless, ds.pixel_array)
        else:
            ds.decompress()
            ds.file_meta.TransferSyntaxUID = syntax
        ds.save_as(f, enforce_file_format=True)


def _chest_phantom(shape=(6, 96, 112)) -> np.ndarray:
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    ct = np.full(shape, -1000, np.int16)
    ct[((y - 48) / 44.0) ** 2 + ((x - 56) / 52.0) ** 2 < 1] = 40
    ct[((y - 48) / 28.0) ** 2 + ((x - 32) / 16.0) ** 2 < 1] = -850
    ct[((y - 48) / 28.0) ** 2 + ((x - 80) / 16.0) ** 2 < 1] = -850
    return ct


def _nifti(arr: np.ndarray, path: Path, spacing=(2.0, 2.0, 4.0)) -> None:
    img = sitk.GetImageFromArray(arr)
    if img.GetDimension() == len(spacing):
        img.SetSpacing(spacing)
    suffix = ".nii.gz" if str(path).endswith(".gz") else ".nii"
    tmp = path.parent / f".staging{suffix}"  # SimpleITK takes UTF-8 names only; the final name may be any bytes
    sitk.WriteImage(img, str(tmp))
    os.replace(tmp, path)


def make_corpus(out: Path, sample: Path) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}

    def case(name: str, outcome: str) -> Path:
        expected[name] = outcome
        return out / name

    # --- DICOM series: good ones in several encodings
    _series(sample, case("dicom_jpeg_lossless", "ok"))
    _transcode(_series(sample, case("dicom_explicit_le", "ok")), ExplicitVRLittleEndian)
    _transcode(_series(sample, case("dicom_implicit_le", "ok")), ImplicitVRLittleEndian)
    _transcode(_series(sample, case("dicom_rle", "ok")), RLELossless)
    files = _series(sample, case("dicom_patient_tags_traversal", "ok"))
    for f in files:
        _edit(f, PatientName="../../etc/evil^Name/..", PatientID="../../../tmp/x/y", StudyDescription="a/b\\c")
    files = _series(sample, case("dicom file names with spaces ü", "ok"))
    for f in files:
        f.rename(f.with_name(f"slice ü {f.stem}.dcm"))
    mixed = case("dicom_two_series_one_folder", "ok")
    _series(sample, mixed / "tmp_a")
    _series(sample, mixed / "tmp_b")
    for f in [*(mixed / "tmp_a").glob("*.dcm"), *(mixed / "tmp_b").glob("*.dcm")]:
        f.rename(mixed / f"{f.parent.name}_{f.name}")
    (mixed / "tmp_a").rmdir()
    (mixed / "tmp_b").rmdir()

    # --- DICOM series that must fail with a clear error
    files = _series(sample, case("dicom_missing_slice", "failed"))
    files[2].unlink()
    files = _series(sample, case("dicom_uneven_spacing", "failed"))
    ds = pydicom.dcmread(files[1])
    _edit(files[1], ImagePositionPatient=[float(v) for v in ds.ImagePositionPatient[:2]] + [float(ds.ImagePositionPatient[2]) + 0.7])
    files = _series(sample, case("dicom_truncated_file", "failed"))
    files[2].write_bytes(files[2].read_bytes()[:4000])
    files = _series(sample, case("dicom_zero_byte_file", "failed"))
    files[3].write_bytes(b"")
    files = _series(sample, case("dicom_duplicate_position", "failed"))
    ds = pydicom.dcmread(files[1])
    _edit(files[2], ImagePositionPatient=list(ds.ImagePositionPatient))
    files = _series(sample, case("dicom_mixed_orientation", "failed"))
    _edit(files[2], ImageOrientationPatient=[1, 0, 0, 0, 0.8, -0.6])
    files = _series(sample, case("dicom_missing_position", "failed"))
    for f in files:
        _edit(f, ImagePositionPatient=None)
    files = _series(sample, case("dicom_non_ct_modality", "failed"))
    for f in files:
        _edit(f, Modality="MR")
    _series(sample, case("dicom_single_slice", "failed"), n=1)
    files = _series(sample, case("dicom_huge_matrix", "failed"), n=2)
    for f in files:
        _edit(f, Rows=60000, Columns=60000)

    # --- things that are not cases
    files = _series(sample, case("dicom_localizer", "skipped"), n=1)
    _edit(files[0], ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    files = _series(sample, case("dicom_structured_report", "skipped"), n=1)
    _edit(files[0], Modality="SR", SOPClassUID="1.2.840.10008.5.1.4.1.1.88.22")
    notd = case("not_dicom", "skipped")
    notd.mkdir()
    (notd / "readme.dcm").write_text("this is a text file with a .dcm extension\n")
    (notd / "notes.txt").write_text("a text file\n")
    (notd / "random.bin").write_bytes(os.urandom(2048))
    (case("empty_folder", "skipped")).mkdir()
    loop = case("symlink_loop", "skipped")
    loop.mkdir()
    try:
        os.symlink("..", loop / "loop")
        os.symlink(loop / "self", loop / "self")
    except OSError:
        pass

    # --- NIfTI
    ct = _chest_phantom()
    _nifti(ct, case("nifti_good.nii.gz", "ok"))
    _nifti(ct, case("nifti name with spaces ä.nii.gz", "ok"))
    _nifti(ct, case("nifti_uncompressed.nii", "ok"))
    bad = ct.astype(np.float32)
    bad[3, 40, 30] = np.nan
    _nifti(bad, case("nifti_nan.nii.gz", "failed"))
    bad = ct.astype(np.float32)
    bad[1, 40, 30] = np.inf
    _nifti(bad, case("nifti_inf.nii.gz", "failed"))
    _nifti(ct[0], case("nifti_2d.nii.gz", "failed"), spacing=(2.0, 2.0))
    img4 = sitk.JoinSeries([sitk.GetImageFromArray(ct), sitk.GetImageFromArray(ct)])
    sitk.WriteImage(img4, str(case("nifti_4d.nii.gz", "failed")))
    _nifti(np.full((6, 96, 112), 40, np.int16), case("nifti_no_lung.nii.gz", "failed"))
    case("nifti_zero_byte.nii.gz", "failed").write_bytes(b"")
    good = (out / "nifti_good.nii.gz").read_bytes()
    case("nifti_truncated.nii.gz", "failed").write_bytes(good[: len(good) // 3])
    fake = case("nifti_wrong_extension.nii.gz", "failed")
    fake.write_bytes(gzip.compress(b"\x89PNG\r\n\x1a\n" + os.urandom(512)))
    huge = case("nifti_huge_header.nii.gz", "failed")
    import nibabel as nib

    h = nib.Nifti1Header()
    h.set_data_shape((30000, 30000, 30000))  # int16 dims: the largest a NIfTI-1 header holds
    h.set_data_dtype(np.int16)
    with gzip.open(huge, "wb") as f:
        f.write(h.binaryblock + b"\x00" * 4 + b"\x00" * 64)
    add_real_world_names_and_dirty_dicom(out, sample, expected)
    return expected


def add_real_world_names_and_dirty_dicom(out: Path, sample: Path, expected: dict[str, str]) -> None:
    """The cases of issue 22 (see the module docstring); ``expected`` keys are display names."""

    def case(name: str | bytes, outcome: str) -> str:
        """The path (``str``, surrogate-escaped where the name is not UTF-8) of a new top-level entry."""
        key = display_text(os.fsdecode(name) if isinstance(name, bytes) else name)
        expected[key] = outcome
        return os.path.join(os.fsdecode(out), os.fsdecode(name))

    ct = _chest_phantom()
    # names the OS allows: Latin-1 bytes (old Windows/Samba exports), newline, CR, ANSI escapes, formula starts
    _series(sample, Path(case(b"dicom_latin1_caf\xe9_s\xe9rie", "ok")))
    _nifti(ct, Path(case(b"nifti_latin1_\xe9t\xe9.nii.gz", "ok")))
    _series(sample, Path(case("dicom_newline\nin name", "ok")))
    _series(sample, Path(case("dicom_carriage\rreturn", "ok")))
    _series(sample, Path(case("dicom_ansi_\x1b[31mred\x1b[0m_\x1b]0;title\x07", "ok")))
    _nifti(ct, Path(case("=HYPERLINK(\"http---x\";\"y\").nii.gz", "ok")))
    _nifti(ct, Path(case("+plus.nii.gz", "ok")))
    _nifti(ct, Path(case("-minus.nii.gz", "ok")))
    _nifti(ct, Path(case("@at.nii.gz", "ok")))
    # case folders named like the batch's own files
    for name in ("report.csv", "report.html", "skipped.csv"):
        _series(sample, Path(case(name, "ok")))
    # dirty DICOM
    dirty_uid_series(sample, Path(case("dicom_dirty_uids", "ok")))  # no SEG, reason in result.json and report
    dirty_uid_series(sample, Path(case("dicom_uuid_study_series", "ok")), empty_sop=False)
    files = _series(sample, Path(case("dicom_tags_with_control_chars", "ok")))
    for f in files:  # a SEG must copy the patient name; an invalid one means no SEG (with the reason)
        _edit(f, PatientName="Doe^\x1b[31mJohn\nX", StudyDescription="line1\r\nline2", PatientSex="X")
    files = _series(sample, Path(case("dicom_study_tags_repairable", "ok")))
    for f in files:  # repaired in the SEG only: type 2/3 values that do not link the SEG to the images
        _edit(f, StudyDescription="a\\b", PatientSex="unknown", StudyDate="2020-03-01")
    files = _series(sample, Path(case("dicom_latin1_tags_undeclared", "ok")))
    for f in files:  # Latin-1 bytes and no SpecificCharacterSet, as old exports write them
        ds = pydicom.dcmread(f)
        if "SpecificCharacterSet" in ds:
            del ds.SpecificCharacterSet
        ds.add_new(0x00100010, "PN", b"M\xfcller^J\xfcrgen")
        ds.add_new(0x00081030, "LO", b"Thorax \xe4")
        ds.save_as(f)
    files = _series(sample, Path(case("dicom_latin1_tags_declared", "ok")))
    for f in files:
        _edit(f, SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Jürgen", StudyDescription="Thorax ä")
    files = _series(sample, Path(case("dicom_modality_with_escapes", "failed")))
    for f in files:
        _edit(f, Modality="M\x1b[2J\nR")
    # what the walk cannot reach
    long_root = Path(case("path_longer_than_path_max", "skipped"))
    staging = out / ".long_series_staging"
    _series(sample, staging)
    make_long_path(long_root, staging)
    deep = Path(case("folder_too_deep", "skipped"))
    from data_prep.io import MAX_DEPTH

    bottom = deep.joinpath(*["d"] * (MAX_DEPTH + 1))
    bottom.mkdir(parents=True)
    _nifti(ct, bottom / "ct.nii.gz")
    special = Path(case("special_files", "skipped"))
    special.mkdir()
    os.mkfifo(special / "fifo.dcm")
    os.symlink(special / "missing.dcm", special / "broken_link.dcm")
    root = os.geteuid() == 0  # root reads everything: there the folder and the file are ordinary cases
    locked = Path(case("no_read_permission", "ok" if root else "skipped"))
    _series(sample, locked)
    locked.chmod(0)
    locked_file = Path(case("locked_file.nii.gz", "ok" if root else "skipped"))
    _nifti(ct, locked_file)
    locked_file.chmod(0)


def restore_permissions(out: Path) -> None:
    """Make the corpus removable again (``no_read_permission`` and ``locked_file.nii.gz`` are mode 000)."""
    for name in ("no_read_permission", "locked_file.nii.gz"):
        p = out / name
        if p.exists():
            p.chmod(0o755 if p.is_dir() else 0o644)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--sample", default=str(Path(__file__).resolve().parents[2] / "samples" / "ct_dicom" / "P001_slices60-89"))
    a = p.parse_args()
    expected = make_corpus(Path(a.out), Path(a.sample))
    Path(a.out).parent.joinpath("corpus_expected.json").write_text(json.dumps(expected, indent=2))
    print(f"{len(expected)} corpus entries in {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
