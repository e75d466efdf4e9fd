"""Generate a corpus of bad and odd inputs for ``monai-covid infer`` from the real sample series and synthetic data.

``python tests/corpus/make_corpus.py OUT [--sample samples/ct_dicom/P001_slices60-89]`` writes the corpus under OUT
and ``OUT/../corpus_expected.json`` listing, per case folder/file, what ``infer`` should do with it:
``"ok"``, ``"failed"`` or ``"skipped"`` (not a case: localizers, non-image objects, non-DICOM files).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid

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
    ds = pydicom.dcmread(path)
    for k, v in attrs.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    ds.save_as(path)


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
    sitk.WriteImage(img, str(path))


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
    return expected


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
