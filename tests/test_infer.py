"""`monai-covid infer` end to end: real DICOM sample, synthetic NIfTI, broken cases, resume, exit codes."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from monai_covid.batch import REPORT_COLUMNS
from monai_covid.cli import main
from tests.corpus.dciodvfy import assert_valid_dicom


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture(scope="module")
def batch(sample_series, tmp_path_factory):
    """An input tree with a real DICOM series, a synthetic NIfTI CT and three broken cases; one infer run."""
    root = tmp_path_factory.mktemp("infer")
    inp = root / "in"
    series = inp / "site A" / "P001 sample"
    shutil.copytree(sample_series, series)
    # synthetic chest-like CT: body, two lungs at -850 HU with a dense lesion, in an unusual geometry
    z, y, x = np.mgrid[:6, :96, :112]
    ct = np.full((6, 96, 112), -1000, np.int16)
    ct[((y - 48) / 44.0) ** 2 + ((x - 56) / 52.0) ** 2 < 1] = 40
    ct[((y - 48) / 28.0) ** 2 + ((x - 32) / 16.0) ** 2 < 1] = -850
    ct[((y - 48) / 28.0) ** 2 + ((x - 80) / 16.0) ** 2 < 1] = -850
    ct[:, 40:50, 75:85] = -300
    img = sitk.GetImageFromArray(ct)
    img.SetSpacing((3.0, 3.0, 5.0))
    img.SetOrigin((-150.0, 20.0, 7.5))
    img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    sitk.WriteImage(img, str(inp / "synthetic_ct.nii.gz"))
    # broken cases
    (inp / "empty.nii.gz").write_bytes(b"")
    nan = ct.astype(np.float32)
    nan[2, 10, 10] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(inp / "nan_ct.nii.gz"))
    trunc = inp / "truncated"
    shutil.copytree(sample_series, trunc)
    victim = sorted(trunc.glob("*.dcm"))[7]
    victim.write_bytes(victim.read_bytes()[:3000])
    before = _tree_digest(inp)
    out = root / "out"
    t0 = time.perf_counter()
    rc = main(["infer", str(inp), str(out), "--quiet", "--models", "asegnet"])
    seconds = time.perf_counter() - t0
    with open(out / "report.csv", newline="") as f:
        rows = {r["case_id"]: r for r in csv.DictReader(f)}
    return {"inp": inp, "out": out, "rc": rc, "rows": rows, "before": before, "series": series, "seconds": seconds}


def test_report_and_exit_code(batch):
    assert batch["rc"] == 1  # some cases failed
    rows = batch["rows"]
    assert set(rows) == {"site_A_P001_sample", "synthetic_ct", "empty", "nan_ct", "truncated"}
    with open(batch["out"] / "report.csv", newline="") as f:
        assert csv.DictReader(f).fieldnames[: len(REPORT_COLUMNS)] == REPORT_COLUMNS
    assert rows["site_A_P001_sample"]["status"] == "ok" and rows["synthetic_ct"]["status"] == "ok"
    for cid, needle in (("empty", "empty.nii.gz"), ("nan_ct", "NaN"), ("truncated", "truncated")):
        r = rows[cid]
        assert r["status"] == "failed" and needle in r["error"] and "\n" not in r["error"], r
    html = (batch["out"] / "report.html").read_text()
    assert "site_A_P001_sample/overlay.png" in html and "failed" in html


def test_inputs_unchanged(batch):
    assert _tree_digest(batch["inp"]) == batch["before"]


def test_dicom_case_outputs(batch):
    case = batch["out"] / "site_A_P001_sample"
    row = batch["rows"]["site_A_P001_sample"]
    assert int(row["n_slices"]) == 30
    assert 800 < float(row["lung_volume_ml"]) < 3500
    pct = float(row["lesion_percent_of_lung"])
    assert 0.0 <= pct <= 100.0
    assert float(row["lesion_volume_ml"]) == pytest.approx(pct / 100 * float(row["lung_volume_ml"]), rel=0.01, abs=0.05)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(batch["series"])))
    ref = reader.Execute()
    for name in ("lesion_seg.nii.gz", "lung_mask.nii.gz"):
        m = sitk.ReadImage(str(case / name))
        assert m.GetSize() == ref.GetSize()
        assert m.GetSpacing() == pytest.approx(ref.GetSpacing(), abs=1e-5)
        assert m.GetOrigin() == pytest.approx(ref.GetOrigin(), abs=1e-4)
        assert m.GetDirection() == pytest.approx(ref.GetDirection(), abs=1e-6)
        assert set(np.unique(sitk.GetArrayFromImage(m))) <= {0, 1}
    lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "lesion_seg.nii.gz")))
    lung = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "lung_mask.nii.gz")))
    assert not (lesion & (1 - lung)).any()  # lesions only inside the lung
    # DICOM SEG references every source instance and has one frame per slice
    seg = hd.seg.segread(str(case / "lesion_seg.dcm"))
    sops = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in batch["series"].glob("*.dcm")}
    assert int(seg.NumberOfFrames) == 30
    assert {uid for _, _, uid in seg.get_source_image_uids()} == sops
    assert seg.SegmentSequence[0].SegmentLabel == "COVID-19 lesion"
    frames = seg.get_pixels_by_source_instance(sorted(sops), segment_numbers=[1], ignore_spatial_locations=True)
    assert int(frames.sum()) == int(lesion.sum())
    assert_valid_dicom(case / "lesion_seg.dcm")  # 0 dciodvfy errors: a PACS takes it
    result = json.loads((case / "result.json").read_text())
    assert result["complete"] and result["status"] == "ok" and result["source"] == "site A/P001 sample"
    bundle = Path(__file__).resolve().parents[1] / "bundles" / "covid_ct_lesion_asegnet"
    shipped = json.loads((bundle / "configs" / "inference.json").read_text())
    assert result["lesion_threshold"] == shipped["threshold"]  # the cut the bundle ships, recorded with the mask


def test_nifti_geometry_preserved(batch):
    src = sitk.ReadImage(str(batch["inp"] / "synthetic_ct.nii.gz"))
    out = sitk.ReadImage(str(batch["out"] / "synthetic_ct" / "lung_mask.nii.gz"))
    assert out.GetSize() == src.GetSize()
    assert out.GetSpacing() == pytest.approx(src.GetSpacing())
    assert out.GetOrigin() == pytest.approx(src.GetOrigin())
    assert out.GetDirection() == pytest.approx(src.GetDirection())
    lung = sitk.GetArrayFromImage(out).astype(bool)
    # both synthetic lungs found, outside air and body not
    assert lung[:, 48, 32].all() and lung[:, 48, 80].all() and not lung[:, 48, 56].any() and not lung[:, 2, 2].any()


def test_resume_skips_done_cases(batch):
    done = batch["out"] / "site_A_P001_sample" / "result.json"
    mtime = done.stat().st_mtime_ns
    t0 = time.perf_counter()
    rc = main(["infer", str(batch["inp"]), str(batch["out"]), "--quiet", "--models", "asegnet"])
    assert rc == 1
    assert done.stat().st_mtime_ns == mtime
    assert time.perf_counter() - t0 < max(0.5 * batch["seconds"], 5.0)
    with open(batch["out"] / "report.csv", newline="") as f:
        rows = {r["case_id"]: r for r in csv.DictReader(f)}
    assert rows["site_A_P001_sample"]["lung_volume_ml"] == batch["rows"]["site_A_P001_sample"]["lung_volume_ml"]
    assert not list(batch["out"].rglob("*.part*"))  # no staging files left behind


def test_resume_recomputes_cases_of_other_weights_or_settings(batch, tmp_path, monkeypatch):
    """A finished case is reused only by a run with the same models, weights and inference settings: after a lesion
    threshold change (a copy of the bundle) the rerun recomputes it and records the new cut and signature; a second
    rerun with the same copy reuses it again."""
    out = tmp_path / "out"
    shutil.copytree(batch["out"], out)
    done = out / "site_A_P001_sample" / "result.json"
    old = json.loads(done.read_text())
    assert set(old["model_signature"]) == {"asegnet"}
    root = tmp_path / "bundles"
    bundle = root / "covid_ct_lesion_asegnet"
    repo_bundle = Path(__file__).resolve().parents[1] / "bundles" / "covid_ct_lesion_asegnet"
    shutil.copytree(repo_bundle, bundle, ignore=shutil.ignore_patterns("docs"))
    cfg = json.loads((bundle / "configs" / "inference.json").read_text())
    cfg["threshold"] = 0.95
    (bundle / "configs" / "inference.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("MONAI_COVID_BUNDLES", str(root))
    assert main(["infer", str(batch["inp"]), str(out), "--quiet", "--models", "asegnet"]) == 1
    new = json.loads(done.read_text())
    assert new["lesion_threshold"] == 0.95 and new["model_signature"] != old["model_signature"]
    assert float(new["lesion_volume_ml"]) <= float(old["lesion_volume_ml"])  # a higher cut marks no more lesion
    mtime = done.stat().st_mtime_ns
    assert main(["infer", str(batch["inp"]), str(out), "--quiet", "--models", "asegnet"]) == 1
    assert done.stat().st_mtime_ns == mtime  # same models and settings: reused


def test_usage_errors(batch, tmp_path):
    assert main(["infer", str(batch["inp"]), str(batch["inp"] / "out"), "--quiet"]) == 2
    assert not (batch["inp"] / "out").exists()
    assert main(["infer", str(batch["inp"]), str(tmp_path / "o"), "--models", "nope", "--quiet"]) == 2
    assert main(["infer", str(tmp_path / "missing"), str(tmp_path / "o"), "--quiet"]) == 2


def test_ct_png_slices_and_id_collisions(shared_data, tmp_path):
    inp = tmp_path / "in"
    (inp / "a").mkdir(parents=True)
    (inp / "a_b").mkdir()
    img = shared_data / "ct_lesion_slices" / "train" / "images" / "0.jpg"
    shutil.copyfile(img, inp / "a" / "b.jpg")
    shutil.copyfile(img, inp / "a_b.jpg")
    shutil.copyfile(img, os.path.join(os.fsdecode(inp), os.fsdecode(b"A_B\xe9\n.jpg")))  # Latin-1 byte, newline
    rc = main(["infer", str(inp), str(tmp_path / "out"), "--modality", "ct", "--models", "asegnet", "--quiet"])
    assert rc == 0
    with open(tmp_path / "out" / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # one folder per case even on a case-insensitive file system: a/b.jpg and a_b.jpg do not reuse A_B's
    ids = {r["source"]: r["case_id"] for r in rows}
    assert ids == {"A_B\\xe9\\n.jpg": "A_B", "a/b.jpg": "a_b_2", "a_b.jpg": "a_b_3"}
    from PIL import Image

    for r in rows:
        seg = np.asarray(Image.open(tmp_path / "out" / r["case_id"] / "lesion_seg.png"))
        assert seg.shape == np.asarray(Image.open(img)).shape[:2] and set(np.unique(seg)) <= {0, 255}


def test_cxr_png_and_dicom_dx(shared_data, tmp_path):
    """X-rays: PNG with --modality cxr, and a DICOM DX found by modality; infection map + COVID call in the report."""
    from PIL import Image
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    inp = tmp_path / "in"
    inp.mkdir()
    src = shared_data / "cxr_infection" / "train" / "covid" / "images"
    covid_png = sorted(src.glob("*.png"))[0]
    shutil.copyfile(covid_png, inp / "covid.png")
    arr = np.asarray(Image.open(covid_png).convert("L"))
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = arr.tobytes()
    (inp / "dx").mkdir()
    ds.save_as(inp / "dx" / "xray.dcm", enforce_file_format=True)
    rc = main(["infer", str(inp), str(tmp_path / "out"), "--modality", "cxr", "--models", "cxr", "--quiet"])
    assert rc == 0
    from monai_covid.batch import bundles_dir
    from monai_covid.cxr_detector import bundle_detector

    with open(tmp_path / "out" / "report.csv", newline="") as f:
        rows = {r["case_id"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"covid", "dx"} and all(r["modality"] == "cxr" for r in rows.values())
    for cid in rows:
        m = np.asarray(Image.open(tmp_path / "out" / cid / "infection_map.png"))
        seg = np.asarray(Image.open(tmp_path / "out" / cid / "infection_seg.png"))
        assert m.shape == (*arr.shape, 4) and seg.shape == arr.shape and set(np.unique(seg)) <= {0, 255}
        res = json.loads((tmp_path / "out" / cid / "result.json").read_text())
        assert 0.0 <= res["covid_probability"] <= 1.0
        # the bundle's detector decides (calibrated classifier on the map when it ships one, else the paper's rule)
        assert res["covid_detector"] == bundle_detector(bundles_dir() / "covid_cxr_infection_map_unet").rule
        assert res["covid_detected"] == int(res["covid_probability"] >= res["covid_threshold"])
        # where the map is transparent the probability is ~0; an infected area implies opaque pixels
        assert (res["infected_area_percent"] > 0) <= (m[..., 3] == 255).any()
    # the same pixels through PNG and DICOM give the same call
    assert float(rows["covid"]["covid_probability"]) == pytest.approx(float(rows["dx"]["covid_probability"]), abs=0.02)


def test_torchrun_shards_cases_and_merges_report(tmp_path):
    """torchrun with 2 CPU ranks (gloo): each case processed once, one merged report in input order."""
    import socket
    import subprocess
    import sys

    from tests.corpus.make_corpus import _chest_phantom, _nifti

    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(3):
        _nifti(_chest_phantom(), inp / f"ct{i}.nii.gz")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "monai_covid.cli", "infer", str(inp), str(tmp_path / "out"),
           "--models", "asegnet", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(tmp_path / "out" / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [x["case_id"] for x in rows] == ["ct0", "ct1", "ct2"] and all(x["status"] == "ok" for x in rows)
    assert all((tmp_path / "out" / f"ct{i}" / "result.json").is_file() for i in range(3))


def test_detector_coverage_rule():
    """A whole-chest series is assessable; a short stretch of lung or few slices is not (no COVID call)."""
    from monai_covid.batch import DETECTOR_MIN_LUNG_EXTENT_MM, DETECTOR_MIN_SLICES, detector_coverage

    lung = np.zeros((160, 8, 8), bool)
    lung[10:150, 2:6, 2:6] = True
    cov = detector_coverage(lung, (2.0, 0.7, 0.7))
    assert cov["assessable"] and cov["lung_extent_mm"] == 280.0
    assert not cov["lung_in_first_slice"] and not cov["lung_in_last_slice"]
    part = detector_coverage(lung[60:90], (2.0, 0.7, 0.7))  # 30 slices: like the shipped sample
    assert not part["assessable"] and part["lung_in_first_slice"] and part["lung_in_last_slice"]
    thick = detector_coverage(lung[::8], (16.0, 0.7, 0.7))  # 20 slices of 16 mm: enough lung, too few slices
    assert thick["lung_extent_mm"] >= DETECTOR_MIN_LUNG_EXTENT_MM and thick["n_slices"] < DETECTOR_MIN_SLICES
    assert not thick["assessable"]


def test_detector_coverage_of_the_real_series(p001_volume, p001_lung):
    from monai_covid.batch import detector_coverage

    cov = detector_coverage(p001_lung, p001_volume.spacing)
    assert cov["assessable"] and cov["n_slices"] == 148 and cov["lung_extent_mm"] > 200


def test_demo_sample_says_what_it_cannot_show(repo_root, tmp_path, capsys):
    """`make demo` input: 30 slices of a COVID-19 CT. The detector's probability comes with the reason it is no call."""
    out = tmp_path / "demo"
    rc = main(["infer", str(repo_root / "samples" / "ct_dicom"), str(out), "--models", "asegnet", "resnextplus"])
    printed = capsys.readouterr().out
    assert rc == 0
    result = json.loads((out / "P001_slices60-89" / "result.json").read_text())
    cov = result["detector_coverage"]
    assert cov["assessable"] is False and cov["n_slices"] == 30 and 50 <= cov["lung_extent_mm"] <= 62
    assert result["covid_label"] is None and 0.0 <= result["covid_probability"] <= 1.0
    assert any(w.startswith("partial series (30 slices") for w in result["warnings"])
    note = [ln for ln in printed.splitlines() if ln.startswith("note: P001_slices60-89: partial series")]
    assert len(note) == 1 and "no COVID/not-COVID call" in note[0], printed
    with open(out / "report.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert row["warnings"].startswith("partial series") and row["covid_probability"] != ""
    assert result["dicom_seg"] == {"written": True, "repairs": []}
    assert_valid_dicom(out / "P001_slices60-89" / "lesion_seg.dcm")
