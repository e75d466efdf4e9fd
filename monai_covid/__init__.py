"""monai-covid: MONAI bundles, data preparation and batch inference for COVID-19 CT and chest X-ray models."""

from __future__ import annotations

# The one place of the package version: setup.cfg reads it (version = attr:), every bundle's metadata.json pins it
# (required_packages_version["monai-covid"]) and tests/test_model_zoo_checks.py checks that they agree.
__version__ = "0.2.0"
