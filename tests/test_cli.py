"""`monai-covid convert` and `lungmask` on real DICOM, and their error paths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from monai_covid.cli import main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "monai_covid.cli", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_convert_matches_simpleitk(sample_series, tmp_path, capsys):
    rc = main(["convert", str(sample_series.parent), str(tmp_path / "out"), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["series"] for r in report["converted"]] == ["P001_slices60-89"]
    out = sitk.ReadImage(str(tmp_path / "out" / "P001_slices60-89.nii.gz"))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(sample_series)))
    ref = reader.Execute()
    assert out.GetPixelID() == sitk.sitkInt16
    assert out.GetSize() == ref.GetSize() == (512, 512, 30)
    assert out.GetSpacing() == pytest.approx(ref.GetSpacing(), abs=1e-6)
    assert out.GetOrigin() == pytest.approx(ref.GetOrigin(), abs=1e-4)
    assert out.GetDirection() == pytest.approx(ref.GetDirection(), abs=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(ref))


def test_lungmask_cli_json(sample_series, tmp_path):
    r = _run("lungmask", sample_series, tmp_path / "lung.nii.gz", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    mask = sitk.ReadImage(str(tmp_path / "lung.nii.gz"))
    arr = sitk.GetArrayFromImage(mask)
    assert arr.shape == (30, 512, 512) and set(np.unique(arr)) == {0, 1}
    ml = arr.sum() * np.prod(mask.GetSpacing()) / 1000
    assert info["lung_volume_ml"] == pytest.approx(ml, rel=1e-3)
    # 30 slices x 2 mm = 6 cm of mid-chest: roughly a third of a lung volume
    assert 800 < ml < 3500


def test_error_paths_are_one_line(sample_series, tmp_path):
    (tmp_path / "empty").mkdir()
    notdicom = tmp_path / "notdicom"
    notdicom.mkdir()
    (notdicom / "x.dcm").write_bytes(b"\x00" * 10)
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    for f in sorted(sample_series.glob("*.dcm"))[:3]:
        shutil.copyfile(f, trunc / f.name)
    victim = sorted(trunc.glob("*.dcm"))[1]
    victim.write_bytes(victim.read_bytes()[:5000])
    cases = [
        (["lungmask", tmp_path / "missing", tmp_path / "o.nii.gz"], 1, "missing"),
        (["lungmask", tmp_path / "empty", tmp_path / "o.nii.gz"], 1, "empty"),
        (["lungmask", notdicom, tmp_path / "o.nii.gz"], 1, "notdicom"),
        (["lungmask", trunc, tmp_path / "o.nii.gz"], 1, victim.name),
        (["convert", tmp_path / "empty", tmp_path / "conv"], 1, "empty"),
        (["convert", sample_series, sample_series / "inside"], 2, "inside the input"),
        (["lungmask", sample_series, tmp_path / "mask.png"], 2, ".nii.gz"),
    ]
    for args, code, needle in cases:
        r = _run(*args)
        assert r.returncode == code, (args, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, (args, r.stderr)
    assert not (sample_series / "inside").exists()


def test_help_on_every_command():
    for cmd in ([], ["convert"], ["lungmask"], ["infer"], ["datalist"]):
        r = _run(*cmd, "--help")
        assert r.returncode == 0 and "usage: monai-covid" in r.stdout


def test_names_that_are_not_utf8_or_hold_control_characters(sample_series, tmp_path, capsys):
    """A Latin-1 folder name (old Windows/Samba exports) is read; a newline/ANSI name shows escaped on one line."""
    (tmp_path / "in").mkdir()
    latin1 = os.path.join(os.fsdecode(tmp_path / "in"), os.fsdecode(b"s\xe9rie"))
    os.mkdir(latin1)
    for f in sorted(sample_series.glob("*.dcm"))[:3]:
        shutil.copyfile(f, os.path.join(latin1, f.name))
    assert main(["convert", str(tmp_path / "in"), str(tmp_path / "conv"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["converted"][0]["series"] == "s\\xe9rie"
    assert sitk.ReadImage(str(tmp_path / "conv" / "s_rie.nii.gz")).GetSize() == (512, 512, 3)
    assert main(["lungmask", latin1, str(tmp_path / "lung.nii.gz")]) == 0
    capsys.readouterr()
    odd = tmp_path / "odd\n\x1b[31mname\r"
    assert main(["lungmask", str(odd), str(tmp_path / "o.nii.gz")]) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "\x1b" not in err and "\r" not in err
    assert "odd\\n\\x1b[31mname\\r: no such file or folder" in lines[0]
