"""Helpers shared by the CT lesion bundle tests (A-SegNet, Co-supervision ResUnet): real slices, a synthetic CT
in HU and a run of a bundle's ``inference.json``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from monai.bundle import ConfigWorkflow

SLICES = ("ct_lesion_slices", "train")


def slice_items(shared_data: Path, stems: list[str]) -> list[dict[str, str]]:
    """Datalist items (image jpg, mask png) of the real training slices ``stems``."""
    root = shared_data.joinpath(*SLICES)
    return [{"image": str(root / "images" / f"{s}.jpg"), "label": str(root / "masks" / f"{s}.png")} for s in stems]


def run_inference(bundle: Path, dataset_dir: Path, output_dir: Path) -> None:
    """Run ``bundle/configs/inference.json`` on CPU over ``dataset_dir``."""
    configs = bundle / "configs"
    wf = ConfigWorkflow(
        config_file=str(configs / "inference.json"),
        meta_file=str(configs / "metadata.json"),
        workflow_type="infer",
        bundle_root=str(bundle),
        dataset_dir=str(dataset_dir),
        output_dir=str(output_dir),
        device="$torch.device('cpu')",
    )
    wf.initialize()
    wf.run()
    wf.finalize()


def synthetic_ct(n: int = 3, size: int = 630) -> np.ndarray:
    """(z, y, x) HU: air outside, a soft-tissue body, two lungs at -850 HU, a -300 HU ground-glass blob."""
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) / (0.40 * size)) ** 2 + ((xx - size / 2) / (0.46 * size)) ** 2 < 1
    lungs = np.zeros_like(body)
    for cx in (0.32 * size, 0.68 * size):
        lungs |= ((yy - size / 2) / (0.28 * size)) ** 2 + ((xx - cx) / (0.13 * size)) ** 2 < 1
    blob = (yy - 0.45 * size) ** 2 + (xx - 0.30 * size) ** 2 < (0.06 * size) ** 2
    sl = np.full((size, size), -1000.0, dtype=np.float32)
    sl[body] = 40.0
    sl[lungs] = -850.0
    sl[blob & lungs] = -300.0
    rng = np.random.default_rng(0)
    return np.stack([sl + rng.normal(0, 15, sl.shape).astype(np.float32) for _ in range(n)])
