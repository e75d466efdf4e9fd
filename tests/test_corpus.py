"""Bad-input corpus through `monai-covid infer`: every case reported, nothing lost, nothing written to the input."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from tests.corpus.make_corpus import make_corpus


def _digest(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            out[rel] = f"link:{os.readlink(p)}" if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _infer(inp, out, *extra, timeout=900):
    cmd = [sys.executable, "-m", "monai_covid.cli", "infer", str(inp), str(out), "--models", "asegnet", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def corpus_run(sample_series, tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    inp = root / "in"
    expected = make_corpus(inp, sample_series)
    before = _digest(inp)
    out = root / "out"
    r = _infer(inp, out)
    with open(out / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {"inp": inp, "out": out, "expected": expected, "before": before, "proc": r, "rows": rows}


def test_corpus_is_large_enough(corpus_run):
    assert len(corpus_run["expected"]) >= 30


def test_every_case_reported_as_expected(corpus_run):
    rows, expected = corpus_run["rows"], corpus_run["expected"]
    by_top: dict[str, list[dict]] = {}
    for r in rows:
        by_top.setdefault(r["source"].split("/")[0], []).append(r)
    for name, outcome in expected.items():
        got = by_top.get(name, [])
        if outcome == "skipped":
            assert all(r["status"] == "ok" for r in got) and not got, (name, got)
        elif outcome == "ok":
            assert got and all(r["status"] == "ok" for r in got), (name, got)
        else:
            assert got and any(r["status"] == "failed" for r in got), (name, got)
    for r in rows:
        assert r["status"] in ("ok", "failed")
        if r["status"] == "failed":
            assert r["error"] and "\n" not in r["error"] and len(r["error"]) < 400
        else:
            assert (corpus_run["out"] / r["case_id"] / "result.json").is_file()
    # the folder holding two series yields two processed cases
    assert len(by_top["dicom_two_series_one_folder"]) == 2
    assert len({r["source"] for r in by_top["dicom_two_series_one_folder"]}) == 2  # told apart in the report
    assert corpus_run["proc"].returncode == 1


def test_skipped_files_are_listed_with_a_reason(corpus_run):
    with open(corpus_run["out"] / "skipped.csv", newline="") as f:
        skipped = {r["path"]: r["reason"] for r in csv.DictReader(f)}
    assert skipped["dicom_localizer/slice000.dcm"] == "localizer"
    assert skipped["dicom_structured_report/slice000.dcm"] == "non-image DICOM object (SR)"
    assert skipped["not_dicom/random.bin"] == "not DICOM"
    reported = {r["source"] for r in corpus_run["rows"]}
    assert not any(p.split("/")[0] in reported or p in reported for p in skipped)  # a file is a case or skipped
    assert "skipped" in corpus_run["proc"].stderr and "skipped.csv" in corpus_run["proc"].stderr


def test_no_traceback_and_no_patient_data_in_logs_or_names(corpus_run, sample_series):
    proc = corpus_run["proc"]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    ds = pydicom.dcmread(next(sample_series.glob("*.dcm")), stop_before_pixels=True)
    secrets = [str(ds.PatientID), "evil", "tmp/x/y"]
    names = [str(p.relative_to(corpus_run["out"])) for p in corpus_run["out"].rglob("*")]
    for s in secrets:
        assert s not in proc.stdout and s not in proc.stderr
        assert not any(s in n for n in names), s
    assert str(ds.PatientID) not in (corpus_run["out"] / "report.csv").read_text()


def test_input_tree_unchanged_and_outputs_contained(corpus_run):
    assert _digest(corpus_run["inp"]) == corpus_run["before"]
    out = corpus_run["out"].resolve()
    for p in corpus_run["out"].rglob("*"):
        assert out in p.resolve().parents or p.resolve() == out
        assert not (p.name.startswith(".") and ".part" in p.name), p  # no staging file (.x.nii.gz.*.part.nii.gz too)


def test_sigkill_then_resume(sample_series, tmp_path):
    from tests.corpus.make_corpus import _series

    inp = tmp_path / "in"
    for i in range(4):
        _series(sample_series, inp / f"case{i}")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai_covid.cli", "infer", str(inp), str(out), "--models", "asegnet", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and not (out / "case0" / "result.json").exists():
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {p.parent.name for p in out.glob("*/result.json")}
    assert "case0" in done_before and len(done_before) < 4
    r = _infer(inp, out, "--quiet")
    assert r.returncode == 0, r.stderr
    with open(out / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(x["case_id"] for x in rows) == [f"case{i}" for i in range(4)]
    assert all(x["status"] == "ok" for x in rows)
    for i in range(4):
        res = json.loads((out / f"case{i}" / "result.json").read_text())
        assert res["complete"] and all((out / f"case{i}" / f).is_file() for f in res["outputs"].values())
    assert not [p for p in out.rglob("*") if ".part" in p.name]
