"""What every bundle must satisfy: model-zoo layout, metadata valid against the vendored schema, fp16 weights that
load with ``weights_only=True`` into the config's network, and the repo's size budgets."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p for p in (REPO / "bundles").iterdir() if (p / "configs").is_dir())
CONFIGS = ("metadata", "train", "evaluate", "inference", "multi_gpu_train")


def test_all_seed_bundles_present():
    names = {b.name for b in BUNDLES}
    assert {"covid_ct_lesion_asegnet", "covid_ct_lesion_cosup_resunet", "covid_cxr_infection_map_unet",
            "covid_ct_slice_ctnet", "covid_ct_volume_resnextplus"} <= names


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_layout_and_metadata(bundle, tmp_path):
    from monai.bundle import verify_metadata

    for name in CONFIGS:
        json.loads((bundle / "configs" / f"{name}.json").read_text())
    assert (bundle / "LICENSE").is_file() and (bundle / "docs" / "README.md").is_file()
    schema = tmp_path / "schema.json"  # a writable copy: verify_metadata would try to download otherwise
    shutil.copy(REPO / "schemas" / "meta_schema_20240725.json", schema)
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(schema))
    # evaluate/multi-GPU configs override train.json rather than copy it
    train = json.loads((bundle / "configs" / "train.json").read_text())
    for name in ("evaluate", "multi_gpu_train"):
        over = json.loads((bundle / "configs" / f"{name}.json").read_text())
        assert "network_def" not in over or over["network_def"] != train.get("network_def")


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_weights_fp16_load_into_network(bundle):
    from monai_covid.inference.lesion import load_bundle_network

    model = bundle / "models" / "model.pt"
    assert model.stat().st_size < 8 * 1024 * 1024
    sd = torch.load(model, map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
    net = load_bundle_network(bundle, "cpu")  # strict load: every key matches the config's network
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_size_budgets():
    weights = sum((b / "models" / "model.pt").stat().st_size for b in BUNDLES)
    assert weights <= 36_000_000
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True).stdout.split("\0")
    tracked = sum((REPO / f).stat().st_size for f in files if f and (REPO / f).is_file())
    if tracked:  # outside a git checkout there is nothing to measure
        assert tracked < 48 * 1024 * 1024
