"""dciodvfy (David Clunie's DICOM validator, Debian package ``dicom3tools``) for the tests: every DICOM SEG the test
suite writes must give 0 errors. ``make test`` installs dicom3tools when it is missing; a run without it fails."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def dciodvfy_errors(path: str | Path) -> list[str]:
    """The ``Error`` lines dciodvfy reports for one DICOM file (warnings are not errors)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail("dciodvfy not found: install the Debian package dicom3tools (`make test` does it when missing)")
    r = subprocess.run([exe, str(path)], capture_output=True, text=True, errors="replace", timeout=300)
    return [ln.strip() for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]


def assert_valid_dicom(path: str | Path) -> None:
    errors = dciodvfy_errors(path)
    assert not errors, f"{path}: {len(errors)} dciodvfy errors, first: {errors[:5]}"
