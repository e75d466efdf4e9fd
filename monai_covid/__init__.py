"""monai-covid: MONAI bundles, data preparation and batch inference for COVID-19 CT and chest X-ray models."""

from __future__ import annotations

__version__ = "0.1.0"
