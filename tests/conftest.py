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
