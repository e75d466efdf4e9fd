"""Shared fixtures: the real data in ../shared/data, required in CI (MONAI_COVID_REQUIRE_DATA=1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MONAI_COVID_DATA", REPO.parent / "shared" / "data"))


def _require_data() -> bool:
    return os.environ.get("MONAI_COVID_REQUIRE_DATA", "") not in ("", "0", "false", "False")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to the shared real data sets; skip (or fail in CI) when they are absent."""
    if not (DATA_DIR / "README.md").is_file():
        msg = f"shared data not found at {DATA_DIR} (set MONAI_COVID_DATA)"
        if _require_data():
            pytest.fail(msg + " and MONAI_COVID_REQUIRE_DATA=1")
        pytest.skip(msg)
    return DATA_DIR


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def p001_volume(shared_data):
    """The real COVID series P001 (148 slices), decoded once per test session."""
    from data_prep.io import read_volume

    return read_volume(shared_data / "ct_dicom" / "P001")


@pytest.fixture(scope="session")
def p001_lung(p001_volume):
    """Lung mask of P001, computed once per test session."""
    from data_prep.lung import lung_mask

    return lung_mask(p001_volume.array, p001_volume.spacing)


@pytest.fixture(scope="session")
def sample_series(repo_root):
    """The 30-slice real sample shipped in the repo (samples/ct_dicom/P001_slices60-89)."""
    return repo_root / "samples" / "ct_dicom" / "P001_slices60-89"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module (several threads spin against each other on a shared 2-core machine and
    run tens of times slower); the previous count is restored afterwards. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
