"""Bundle covid_ct_lesion_asegnet: metadata, network in/out, train/evaluate/inference configs on real slices."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from monai.bundle import verify_net_in_out

from tests.lesion_bundle import check_nifti_geometry, check_slice_inference, train_two_iterations_then_evaluate

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "covid_ct_lesion_asegnet"
CONFIGS = BUNDLE / "configs"


def test_verify_net_in_out():
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=str(CONFIGS / "inference.json"),
        bundle_root=str(BUNDLE),
        n=1,
        any_type=True,
    )


def test_shipped_weights_are_fp16_and_load(tmp_path):
    from monai_covid.inference.lesion import load_bundle_network

    state = torch.load(BUNDLE / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if torch.is_floating_point(v))
    net = load_bundle_network(BUNDLE)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert not net.training


def test_train_two_iterations_then_evaluate(shared_data, tmp_path):
    train_two_iterations_then_evaluate(BUNDLE, shared_data, tmp_path)


def test_inference_on_real_slice(shared_data, tmp_path):
    # a training slice of the shipped model: the mask must overlap the radiologist's lesion mask substantially
    assert check_slice_inference(BUNDLE, shared_data, tmp_path) > 0.4


def test_inference_on_synthetic_nifti_preserves_geometry(tmp_path):
    hu, arr = check_nifti_geometry(BUNDLE, tmp_path)
    # nothing outside the lungs: the body wall and the air around it stay background
    assert not arr[hu > -500].any() or arr[hu > 0].sum() == 0
    assert arr[:, :, :40].sum() == 0 and arr[:, :40, :].sum() == 0


def test_bad_inputs_give_clear_errors(tmp_path):
    from monai_covid.inference.lesion import list_inputs, load_case

    with pytest.raises(FileNotFoundError, match="no png/jpg slices"):
        list_inputs(tmp_path)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_case({"image": str(bad), "kind": "image", "name": "broken"})
