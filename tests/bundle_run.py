"""Run a bundle's ``inference.json`` through ``monai.bundle.ConfigWorkflow``: shared by every bundle test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monai.bundle import ConfigWorkflow


def run_inference(bundle: Path, dataset_dir: Path, output_dir: Path, **overrides: Any) -> None:
    """Run ``bundle/configs/inference.json`` on CPU over ``dataset_dir`` into ``output_dir`` (``overrides``: more
    config values, as on the ``python -m monai.bundle run`` command line)."""
    configs = bundle / "configs"
    wf = ConfigWorkflow(
        config_file=str(configs / "inference.json"),
        meta_file=str(configs / "metadata.json"),
        workflow_type="infer",
        bundle_root=str(bundle),
        dataset_dir=str(dataset_dir),
        output_dir=str(output_dir),
        **{"device": "$torch.device('cpu')", **overrides},
    )
    wf.initialize()
    wf.run()
    wf.finalize()
