"""data_prep.io on the real DICOM series and on synthetic bad input."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from data_prep.io import InputError, find_cases, find_dicom_series, read_nifti, read_volume, safe_name, write_like


def _sitk_reference(folder):
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(folder))
    reader.SetFileNames(names)
    return reader.Execute(), list(names)


def test_dicom_hu_and_geometry_match_simpleitk(shared_data, p001_volume):
    ref, names = _sitk_reference(shared_data / "ct_dicom" / "P001")
    v = p001_volume
    assert v.array.shape == (148, 512, 512)
    np.testing.assert_array_equal(v.array, sitk.GetArrayFromImage(ref).astype(np.float32))
    assert v.image.GetSpacing() == pytest.approx(ref.GetSpacing())
    assert v.image.GetOrigin() == pytest.approx(ref.GetOrigin())
    assert v.image.GetDirection() == pytest.approx(ref.GetDirection())
    assert v.files == names
    # HU: air is about -1000, the raw stored values are 0..4095 with intercept -1024
    assert v.array.min() == pytest.approx(-1024, abs=1)
    assert -1050 < np.median(v.array[:, :40, :40]) < -950


def test_slice_order_follows_position_and_instance_number(shared_data, p001_volume):
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in p001_volume.files]
    assert np.all(np.diff(z) > 0)  # ascending along the normal, as GDCM sorts
    # in this series InstanceNumber 1 is the most superior slice, so instance numbers descend along z
    assert p001_volume.instance_numbers == list(range(148, 0, -1))
    with open(shared_data / "ct_dicom" / "slice_labels.csv") as f:
        locs = {int(r["instance_number"]): float(r["slice_location"]) for r in csv.DictReader(f) if r["series_id"] == "P001"}
    assert [locs[n] for n in p001_volume.instance_numbers] == pytest.approx(z, abs=0.05)


def test_find_cases_groups_series(shared_data):
    cases = find_cases(shared_data / "ct_dicom")
    assert [(c.kind, c.rel) for c in cases] == [("dicom", "P001"), ("dicom", "normal001")] or sorted(
        c.rel for c in cases
    ) == ["P001", "normal001"]
    assert {len(c.series.files) for c in cases} == {148, 154}


def _copy_sample(src, dst, n=None):
    dst.mkdir(parents=True)
    files = sorted(src.glob("*.dcm"))[:n] if n else sorted(src.glob("*.dcm"))
    for f in files:
        shutil.copyfile(f, dst / f.name)
    return sorted(dst.glob("*.dcm"))


def test_missing_slice_is_rejected(sample_series, tmp_path):
    files = _copy_sample(sample_series, tmp_path / "s", n=10)
    files[4].unlink()
    with pytest.raises(InputError, match="missing slice"):
        read_volume(tmp_path / "s")


def test_truncated_file_is_named(sample_series, tmp_path):
    files = _copy_sample(sample_series, tmp_path / "s", n=6)
    data = files[2].read_bytes()
    files[2].write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as e:
        read_volume(tmp_path / "s")
    assert files[2].name in str(e.value) and "\n" not in str(e.value)


def test_mixed_orientation_is_rejected(sample_series, tmp_path):
    files = _copy_sample(sample_series, tmp_path / "s", n=5)
    ds = pydicom.dcmread(files[1])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, -0.6]
    ds.save_as(files[1])
    with pytest.raises(InputError, match="orientation"):
        read_volume(tmp_path / "s")


def test_two_series_in_one_folder_are_split(sample_series, tmp_path):
    files = _copy_sample(sample_series, tmp_path / "s", n=8)
    for f in files[4:]:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
        ds.SeriesNumber = 99
        ds.save_as(f)
    series, errors = find_dicom_series(tmp_path)
    assert not errors and sorted(len(s.files) for s in series) == [4, 4]
    with pytest.raises(InputError, match="2 DICOM series"):
        read_volume(tmp_path / "s")
    cases = find_cases(tmp_path)
    assert len({c.rel for c in cases}) == 2


def test_localizer_and_non_dicom_are_skipped(sample_series, tmp_path):
    files = _copy_sample(sample_series, tmp_path / "s", n=4)
    ds = pydicom.dcmread(files[0])
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.save_as(files[0])
    (tmp_path / "s" / "notes.bin").write_bytes(b"not a dicom file at all")
    series, errors = find_dicom_series(tmp_path)
    assert not errors and len(series) == 1 and len(series[0].files) == 3


def test_nifti_round_trip_and_bad_nifti(tmp_path):
    arr = np.random.default_rng(0).integers(-1024, 400, size=(5, 40, 30)).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((10.0, -20.0, 30.0))
    img.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    sitk.WriteImage(img, str(tmp_path / "ct.nii.gz"))
    v = read_nifti(tmp_path / "ct.nii.gz")
    assert v.spacing == pytest.approx((2.5, 0.8, 0.7))
    out = write_like(v.array > 0, v, tmp_path / "out" / "mask.nii.gz")
    m = sitk.ReadImage(str(out))
    assert m.GetSpacing() == pytest.approx(img.GetSpacing()) and m.GetOrigin() == pytest.approx(img.GetOrigin())
    assert m.GetDirection() == pytest.approx(img.GetDirection())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(m), (arr > 0).astype(np.uint8))

    bad = arr.astype(np.float32)
    bad[2, 3, 4] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(bad), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(InputError, match="NaN"):
        read_nifti(tmp_path / "nan.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(arr[0]), str(tmp_path / "2d.nii.gz"))
    with pytest.raises(InputError, match="3D"):
        read_nifti(tmp_path / "2d.nii.gz")
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match="empty.nii.gz"):
        read_nifti(tmp_path / "empty.nii.gz")


@pytest.mark.parametrize(
    "rel, expected",
    [("P001", "P001"), ("a/b c/ct.nii.gz", "a_b_c_ct"), ("../../etc/passwd", "etc_passwd"), ("é/ü.nii", "case"), ("..", "case")],
)
def test_safe_name(rel, expected):
    assert safe_name(rel) == expected


def test_nifti_reading_matches_simpleitk_with_scaling(tmp_path):
    """nibabel decodes, ITK gives the geometry: together they must equal SimpleITK's own reading."""
    import nibabel as nib

    data = np.random.default_rng(1).integers(0, 3000, size=(40, 32, 7)).astype(np.int16)  # (x, y, z)
    affine = np.array([[-0.7, 0, 0, 90.0], [0, -0.7, 0, 120.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(data, affine)
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, tmp_path / "scaled.nii.gz")
    v = read_nifti(tmp_path / "scaled.nii.gz")
    ref = sitk.ReadImage(str(tmp_path / "scaled.nii.gz"))
    np.testing.assert_array_equal(v.array, sitk.GetArrayFromImage(ref).astype(np.float32))
    assert v.array.min() >= -1024 and v.array.shape == (7, 32, 40)
    assert v.image.GetSpacing() == pytest.approx(ref.GetSpacing())
    assert v.image.GetOrigin() == pytest.approx(ref.GetOrigin())
    assert v.image.GetDirection() == pytest.approx(ref.GetDirection())
    raw = (tmp_path / "scaled.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="truncated"):
        read_nifti(tmp_path / "cut.nii.gz")
