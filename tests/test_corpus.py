"""Bad-input corpus through `monai-covid infer`: every case reported, nothing lost, nothing written to the input.

One run over the whole corpus (``tests/corpus/make_corpus.py``: broken files, odd names, dirty DICOM, unreachable
paths next to good cases) asserts each case's report row, the exit code, the byte-identical input tree and that
the good cases all finished; every DICOM SEG written gives 0 dciodvfy errors.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from tests.corpus.dciodvfy import assert_valid_dicom, dciodvfy_errors
from tests.corpus.make_corpus import make_corpus, restore_permissions


def _digest(root: Path) -> dict[str, str]:
    """Every entry under ``root`` with its type, mode, mtime and content hash, read through folder descriptors
    (so paths longer than PATH_MAX are included; FIFOs are not opened, unreadable files noted as such)."""
    out: dict[str, str] = {}

    def error(e: OSError) -> None:
        out[f"error:{e.filename}"] = e.strerror

    for dirpath, dirnames, filenames, dirfd in os.fwalk(root, onerror=error):
        out[dirpath] = f"dir {stat.filemode(os.stat(dirfd).st_mode)}"
        for name in dirnames + filenames:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            key = os.path.join(dirpath, name)
            if stat.S_ISLNK(st.st_mode):
                out[key] = f"link:{os.readlink(name, dir_fd=dirfd)}"
            elif stat.S_ISREG(st.st_mode):
                try:
                    fd = os.open(name, os.O_RDONLY, dir_fd=dirfd)
                except PermissionError:
                    digest = "unreadable"
                else:
                    with os.fdopen(fd, "rb") as f:
                        digest = hashlib.sha256(f.read()).hexdigest()
                out[key] = f"{stat.filemode(st.st_mode)} {st.st_mtime_ns} {digest}"
            elif not stat.S_ISDIR(st.st_mode):
                out[key] = f"special {stat.filemode(st.st_mode)}"
    return out


def _unformula(cell: str) -> str:
    """A report cell as written before the CSV-injection escape (a leading ``'`` before ``= + - @``)."""
    return cell[1:] if cell[:1] == "'" and cell[1:2] in ("=", "+", "-", "@") else cell


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
    with open(out / "report.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    yield {"inp": inp, "out": out, "expected": expected, "before": before, "proc": r, "rows": rows}
    restore_permissions(inp)


def test_corpus_is_large_enough(corpus_run):
    assert len(corpus_run["expected"]) >= 30


def test_every_case_reported_as_expected(corpus_run):
    rows, expected = corpus_run["rows"], corpus_run["expected"]
    by_top: dict[str, list[dict]] = {}
    for r in rows:
        by_top.setdefault(_unformula(r["source"]).split("/")[0], []).append(r)
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
    assert skipped["not_dicom/notes.txt"] == "not DICOM (txt file, not read)"
    reported = {_unformula(r["source"]) for r in corpus_run["rows"]}
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


def _row(corpus_run, source: str) -> dict:
    rows = [r for r in corpus_run["rows"] if _unformula(r["source"]) == source]
    assert len(rows) == 1, (source, [r["source"] for r in corpus_run["rows"]])
    return rows[0]


def test_names_the_os_allows_are_cases(corpus_run):
    """Latin-1 bytes, newline, CR, ANSI escapes, formula starts: processed, shown escaped, output names plain ASCII."""
    out = corpus_run["out"]
    for source in ("dicom_latin1_caf\\xe9_s\\xe9rie", "nifti_latin1_\\xe9t\\xe9.nii.gz", "dicom_newline\\nin name",
                   "dicom_carriage\\rreturn", "dicom_ansi_\\x1b[31mred\\x1b[0m_\\x1b]0;title\\x07",
                   '=HYPERLINK("http---x";"y").nii.gz', "+plus.nii.gz", "-minus.nii.gz", "@at.nii.gz"):
        row = _row(corpus_run, source)
        assert row["status"] == "ok", row
        assert re.fullmatch(r"[A-Za-z0-9._-]+", row["case_id"]), row["case_id"]
        result = json.loads((out / row["case_id"] / "result.json").read_text(encoding="utf-8"))
        assert result["source"] == source and result["complete"]
    assert _row(corpus_run, "dicom_latin1_caf\\xe9_s\\xe9rie")["case_id"] == "dicom_latin1_caf__s_rie"


def test_case_folders_named_like_the_report_files(corpus_run):
    out = corpus_run["out"]
    for name in ("report.csv", "report.html", "skipped.csv"):
        row = _row(corpus_run, name)
        assert row["status"] == "ok" and row["case_id"] == f"{name}_2", row
        assert (out / name).is_file() and (out / row["case_id"] / "result.json").is_file()


def test_report_files_are_one_safe_line_per_row(corpus_run):
    """UTF-8, no raw control characters, one physical line per row, no cell a spreadsheet would run as a formula."""
    for name in ("report.csv", "skipped.csv"):
        raw = (corpus_run["out"] / name).read_bytes()
        text = raw.decode("utf-8")  # strict: non-UTF-8 bytes of names are escaped, never copied
        assert not re.search("[\\x00-\\x09\\x0b-\\x1f\\x7f]", text), name
        rows = list(csv.reader(text.splitlines()))
        assert len(rows) == text.count("\n") and len({len(r) for r in rows}) == 1, name
        for row in rows[1:]:
            for cell in row:
                assert cell[:1] not in ("=", "+", "-", "@"), (name, cell)
    html = (corpus_run["out"] / "report.html").read_text(encoding="utf-8")
    assert "\x1b" not in html and "<script" not in html.lower()


def test_console_output_has_no_raw_control_characters(corpus_run):
    proc = corpus_run["proc"]
    assert "\x1b" not in proc.stdout and "\x1b" not in proc.stderr
    failed = [ln for ln in proc.stderr.split("\n") if "failed: " in ln]
    assert any("modality M\\x1b[2J R is not CT" in ln for ln in failed), failed
    assert len(failed) == sum(r["status"] == "failed" for r in corpus_run["rows"])


def test_unreachable_paths_are_listed_in_skipped_csv(corpus_run):
    with open(corpus_run["out"] / "skipped.csv", newline="", encoding="utf-8") as f:
        skipped = list(csv.DictReader(f))
    by_top: dict[str, list[str]] = {}
    for r in skipped:
        by_top.setdefault(r["path"].split("/")[0], []).append(r["reason"])
    assert by_top["path_longer_than_path_max"] == ["path longer than PATH_MAX (4096 bytes): not reachable by name"]
    assert by_top["folder_too_deep"] == ["folder nested more than 128 levels below INPUT: not searched"]
    assert sorted(by_top["special_files"]) == ["broken symbolic link (or a link loop)",
                                               "not a regular file (device, FIFO or socket)"]
    assert "symbolic link to a folder: not followed" in by_top["symlink_loop"]
    if os.geteuid() != 0:  # root may read anything: there these two are ordinary cases
        assert by_top["no_read_permission"] == ["folder permission denied"]
        assert by_top["locked_file.nii.gz"] == ["permission denied"]


def test_dirty_uid_series_get_no_seg_and_a_stated_reason(corpus_run):
    out = corpus_run["out"]
    for source, needle in (("dicom_dirty_uids", "SOPInstanceUIDs are empty"),
                           ("dicom_uuid_study_series", "StudyInstanceUID is UUID text"),
                           ("dicom_tags_with_control_chars", "PatientName: control character")):
        row = _row(corpus_run, source)
        assert row["status"] == "ok" and row["error"] == "", row
        assert row["warnings"].startswith("no DICOM SEG: ") and needle in row["warnings"], row
        result = json.loads((out / row["case_id"] / "result.json").read_text())
        assert result["dicom_seg"]["written"] is False and needle in result["dicom_seg"]["reason"]
        assert "dicom_seg" not in result["outputs"] and not (out / row["case_id"] / "lesion_seg.dcm").exists()
        assert {"lesion_seg", "lung_mask", "overlay"} <= set(result["outputs"])
        assert all((out / row["case_id"] / f).is_file() for f in result["outputs"].values())
    for row in corpus_run["rows"]:  # the UID values themselves are not shown (they identify a study)
        assert not re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-", row["warnings"] + row["error"]), row


def test_repairable_study_values_are_repaired_in_the_seg_only(corpus_run, sample_series):
    out = corpus_run["out"]
    row = _row(corpus_run, "dicom_study_tags_repairable")
    result = json.loads((out / row["case_id"] / "result.json").read_text())
    assert result["dicom_seg"]["written"] is True
    repaired = sorted(r.split(":")[0] for r in result["dicom_seg"]["repairs"])
    assert repaired == ["PatientSex", "StudyDate", "StudyDescription"]
    assert "repaired" in row["warnings"]
    seg = pydicom.dcmread(out / row["case_id"] / "lesion_seg.dcm", stop_before_pixels=True)
    assert seg.PatientSex == "" and seg.StudyDate == "" and "StudyDescription" not in seg
    src = pydicom.dcmread(next((corpus_run["inp"] / "dicom_study_tags_repairable").glob("*.dcm")))
    assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.PatientID == src.PatientID


def test_undeclared_latin1_text_gets_a_declared_character_set_in_the_seg(corpus_run):
    from monai_covid.batch import seg_dataset_problems

    out = corpus_run["out"]
    row = _row(corpus_run, "dicom_latin1_tags_undeclared")
    result = json.loads((out / row["case_id"] / "result.json").read_text())
    assert result["dicom_seg"]["written"] is True
    assert [r.split(":")[0] for r in result["dicom_seg"]["repairs"]] == ["SpecificCharacterSet"]
    seg = pydicom.dcmread(out / row["case_id"] / "lesion_seg.dcm", stop_before_pixels=True)
    src = pydicom.dcmread(next((corpus_run["inp"] / "dicom_latin1_tags_undeclared").glob("*.dcm")))
    assert seg.SpecificCharacterSet == "ISO_IR 100" and "SpecificCharacterSet" not in src
    assert str(seg.PatientName) == str(src.PatientName) == "Müller^Jürgen"
    # the check that makes the repair necessary: the source's own header is not valid DICOM as it stands
    assert ("PatientName", "non-ASCII text but no SpecificCharacterSet") in seg_dataset_problems(src)
    row = _row(corpus_run, "dicom_latin1_tags_declared")
    result = json.loads((out / row["case_id"] / "result.json").read_text())
    assert result["dicom_seg"] == {"written": True, "repairs": []} and row["warnings"] == ""


def test_every_written_seg_passes_dciodvfy(corpus_run):
    """The mixed folder: dirty-UID series, clean series, odd names and broken files side by side."""
    segs = sorted(corpus_run["out"].glob("*/lesion_seg.dcm"))
    ok_dicom = [r for r in corpus_run["rows"] if r["status"] == "ok" and r["case_id"] + "/lesion_seg.dcm" in
                {f"{p.parent.name}/{p.name}" for p in segs}]
    assert len(segs) >= 15 and len(ok_dicom) == len(segs)
    for seg in segs:
        assert_valid_dicom(seg)
    # the validator itself catches what the issue reported: a slice of the dirty series is not valid DICOM
    dirty = next((corpus_run["inp"] / "dicom_dirty_uids").glob("*.dcm"))
    assert any("UID" in e for e in dciodvfy_errors(dirty))


@pytest.mark.parametrize("raw,shown", [
    (os.fsdecode(b"caf\xe9/s\xe9rie"), "caf\\xe9/s\\xe9rie"),  # a Latin-1 byte as Python holds it (surrogateescape)
    (b"caf\xe9", "caf\\xe9"),
    ("line\nbreak\rcr\ttab", "line\\nbreak\\rcr\\ttab"),
    ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
    ("abc\u202etxt.exe", "abc\\u202etxt.exe"),  # right-to-left override
    ("\ud800", "\\ud800"),  # a lone surrogate not from surrogateescape
    ("Müller ü 胸部", "Müller ü 胸部"),  # valid text passes unchanged
])
def test_display_text(raw, shown):
    from monai_covid.io_utils import display_text

    assert display_text(raw) == shown and display_text(shown) == shown
    shown.encode("utf-8")


@pytest.mark.parametrize("cell,written", [
    ("=1+2", "'=1+2"), ("+x", "'+x"), ("-x", "'-x"), ("@SUM(A1)", "'@SUM(A1)"), ("a=b", "a=b"),
    ("\x1b=x", "\\x1b=x"), (0.25, 0.25), (None, None), ("", ""),
])
def test_csv_safe_cell(cell, written):
    from monai_covid.io_utils import csv_safe_cell

    assert csv_safe_cell(cell) == written


def test_one_odd_value_spoils_only_its_own_cell(tmp_path):
    from monai_covid.batch import write_report

    class Unprintable:
        def __str__(self):
            raise RuntimeError("no")

    results = [
        {"case_id": "a", "source": os.fsdecode(b"a\xe9\n"), "status": "ok", "n_slices": 5, "warnings": ["w1", "=w2"]},
        {"case_id": "b", "source": Unprintable(), "status": "failed", "error": "=cmd|' /C calc'!A0"},
        {"case_id": "c", "source": "c", "status": "ok", "lung_volume_ml": 12.5},
    ]
    write_report(results, tmp_path)
    with open(tmp_path / "report.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["case_id"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["source"] == "a\\xe9\\n" and rows[0]["warnings"] == "w1; =w2" and rows[0]["n_slices"] == "5"
    assert rows[1]["source"] == "(value not shown: RuntimeError)" and rows[1]["error"] == "'=cmd|' /C calc'!A0"
    assert rows[2]["lung_volume_ml"] == "12.5"
    assert "(value not shown: RuntimeError)" in (tmp_path / "report.html").read_text(encoding="utf-8")


@pytest.mark.parametrize("edit,needle", [
    ({}, None),
    ({"SOPInstanceUID": ""}, "2 of 2 source SOPInstanceUIDs are empty"),
    ({"StudyInstanceUID": "1.2.03.4"}, "source StudyInstanceUID is not a DICOM UID"),
    ({"SeriesInstanceUID": "1." + "2" * 70}, "source SeriesInstanceUID has 72 characters (at most 64)"),
    ({"FrameOfReferenceUID": "7d444840-9dc0-11d1-b245-5ffdce74fad2"}, "source FrameOfReferenceUID is UUID text"),
    ({"SOPInstanceUID": "1.2.3"}, "1 source SOPInstanceUIDs are duplicated"),
])
def test_seg_source_problems(sample_series, edit, needle):
    from monai_covid.batch import seg_source_problems

    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(sample_series.glob("*.dcm"))[:2]]
    for h in heads:
        for k, v in edit.items():
            setattr(h, k, v)
    problems = seg_source_problems(heads)
    assert (problems == []) if needle is None else any(p.startswith(needle) for p in problems), problems


def test_walk_lists_folders_it_may_not_read(tmp_path, monkeypatch):
    """Permission denied while walking (simulated: the tests may run as root, who reads everything)."""
    from data_prep import io as dio

    (tmp_path / "open").mkdir()
    (tmp_path / "closed" / "inner").mkdir(parents=True)
    (tmp_path / "open" / "x.nii.gz").write_bytes(b"")
    real = os.scandir

    def scandir(path="."):
        if os.fsdecode(path).endswith("closed"):
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(dio.os, "scandir", scandir)
    skipped: list[tuple[str, str]] = []
    cases = dio.find_cases(tmp_path, skipped=skipped)
    assert [c.rel for c in cases] == ["open/x.nii.gz"]
    assert skipped == [(str(tmp_path / "closed"), "folder permission denied")]


def _interrupt_after(cmd: list[str], done: Path, sig: int) -> tuple[int, str]:
    """Start ``cmd``, wait until ``done`` exists (a case finished), send ``sig`` while the next case runs."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and not done.exists() and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr


def test_sigkill_sigterm_sigint_then_resume(sample_series, tmp_path):
    """Killed (SIGKILL), then stopped (SIGTERM, SIGINT) one case further each time, then resumed: each stop leaves
    no staging file, SIGTERM/SIGINT print one line and exit 143/130, finished cases are never recomputed."""
    from tests.corpus.make_corpus import _series

    inp = tmp_path / "in"
    for i in range(4):
        # 20 slices a case: a case must outlast the 0.3 s between "the previous case finished" and the signal, also on
        # a fast machine (with 5 slices CI once finished the last case first and got SIGINT during interpreter exit)
        _series(sample_series, inp / f"case{i}", n=20)
    before = _digest(inp)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai_covid.cli", "infer", str(inp), str(out), "--models", "asegnet", "--quiet"]

    def finished() -> set[str]:
        return {p.parent.name for p in out.glob("*/result.json")}

    rc, _ = _interrupt_after(cmd, out / "case0" / "result.json", signal.SIGKILL)
    assert rc == -signal.SIGKILL and "case0" in finished() and len(finished()) < 4
    mtime = (out / "case0" / "result.json").stat().st_mtime_ns
    for case, sig, code, name in (("case1", signal.SIGTERM, 143, "SIGTERM"), ("case2", signal.SIGINT, 130, "SIGINT")):
        rc, stderr = _interrupt_after(cmd, out / case / "result.json", sig)
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert rc == code, stderr
        assert len(lines) == 1 and lines[0].startswith(f"monai-covid: interrupted by {name}; finished cases are kept")
        assert case in finished() and len(finished()) < 4
        assert not [p for p in out.rglob("*") if ".part" in p.name]  # the case in progress left no staging file
    r = _infer(inp, out, "--quiet")
    assert r.returncode == 0, r.stderr
    with open(out / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [x["case_id"] for x in rows] == [f"case{i}" for i in range(4)] and all(x["status"] == "ok" for x in rows)
    assert (out / "case0" / "result.json").stat().st_mtime_ns == mtime  # resumed, not recomputed
    for i in range(4):
        res = json.loads((out / f"case{i}" / "result.json").read_text())
        assert res["complete"] and all((out / f"case{i}" / f).is_file() for f in res["outputs"].values())
        assert_valid_dicom(out / f"case{i}" / "lesion_seg.dcm")
    assert not [p for p in out.rglob("*") if ".part" in p.name]
    assert _digest(inp) == before
