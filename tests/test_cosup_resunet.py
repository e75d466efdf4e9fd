"""Co-supervision ResUnet: network heads, edge / auxiliary targets, loss terms, bundle training and inference."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from monai_covid.losses import CoSupervisionLoss, downsample_mask, morphological_edge
from monai_covid.networks.cosup_resunet import CoSupResUnet, seg_logits
from tests.lesion_bundle import (
    check_nifti_geometry,
    check_slice_inference,
    synthetic_ct,
    train_two_iterations_then_evaluate,
)

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "covid_ct_lesion_cosup_resunet"
CONFIGS = BUNDLE / "configs"

SWITCHES = [
    {},
    {"edge": False},
    {"aux": False},
    {"fusion": False},
    {"edge": False, "aux": False, "fusion": False},
]


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: "-".join(f"no_{k}" for k in s) or "full")
def test_heads_in_train_and_eval_mode(switches):
    torch.manual_seed(0)
    net = CoSupResUnet(channels=(4, 8, 16, 32, 64), **switches)
    x = torch.rand(2, 1, 64, 96)
    out = net.train()(x)
    assert out["seg"].shape == (2, 2, 64, 96)
    if switches.get("edge", True):
        assert out["edge"].shape == (2, 1, 64, 96)
    else:
        assert "edge" not in out
    if switches.get("aux", True):
        assert [tuple(a.shape) for a in out["aux"]] == [(2, 2, 8, 12), (2, 2, 16, 24)]  # 1/8 then 1/4
    else:
        assert "aux" not in out
    pred = net.eval()(x)
    assert isinstance(pred, torch.Tensor) and pred.shape == (2, 2, 64, 96)
    assert torch.equal(seg_logits(pred), pred) and seg_logits(out) is out["seg"]
    # the modules that are switched off have no parameters (an ablation is a smaller net, not a masked one)
    names = {n.split(".")[0] for n, _ in net.named_parameters()}
    assert ("edge_head" in names) == switches.get("edge", True)
    assert ("aux_heads" in names) == switches.get("aux", True)
    assert ("fusion_gate" in names) == switches.get("fusion", True)


def test_norm_switch_keeps_the_shipped_keys_and_drops_batch_statistics():
    """``norm="batch"`` (default) loads the shipped weights strictly; ``"instance"`` has no BatchNorm and normalises
    each image on its own (an image's training-mode output does not depend on the rest of the batch)."""
    shipped = torch.load(REPO / "bundles/covid_ct_lesion_cosup_resunet/models/model.pt", weights_only=True)
    CoSupResUnet().load_state_dict(shipped)
    inst = CoSupResUnet(channels=(4, 8, 16, 32), norm="instance").train()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in inst.modules())
    assert sum(isinstance(m, torch.nn.InstanceNorm2d) for m in inst.modules()) == sum(
        isinstance(m, torch.nn.BatchNorm2d) for m in CoSupResUnet(channels=(4, 8, 16, 32)).modules()
    )
    x = torch.randn(3, 1, 32, 32)
    assert torch.allclose(inst(x)["seg"][:1], inst(x[:1])["seg"], atol=1e-5)


def test_3d_and_bad_arguments():
    net = CoSupResUnet(spatial_dims=3, channels=(2, 4, 8, 16)).eval()
    assert net(torch.rand(1, 1, 8, 8, 8)).shape == (1, 2, 8, 8, 8)
    with pytest.raises(ValueError, match="4 levels"):
        CoSupResUnet(channels=(8, 16, 32))
    with pytest.raises(ValueError, match="aux_levels"):
        CoSupResUnet(channels=(8, 16, 32, 64), aux_levels=3)


def _square(size: int = 8, lo: int = 2, hi: int = 6) -> torch.Tensor:
    m = torch.zeros(1, 1, size, size)
    m[..., lo:hi, lo:hi] = 1
    return m


def test_morphological_edge_of_a_square():
    edge = morphological_edge(_square())[0, 0]
    expected = torch.zeros(8, 8)
    expected[1:7, 1:7] = 1  # dilation: the square and the ring of background pixels touching it
    expected[3:5, 3:5] = 0  # minus erosion: the interior that is not on the square's boundary
    assert torch.equal(edge, expected)
    assert edge[2, 2] == 1 and edge[2, 4] == 1 and edge[1, 3] == 1  # boundary pixels inside and outside
    assert edge[3, 3] == 0 and edge[0, 0] == 0 and edge[7, 7] == 0  # interior and far background
    # the image border is not a lesion boundary
    full = morphological_edge(torch.ones(1, 1, 5, 5))
    assert not full.any()
    corner = morphological_edge(_square(6, 0, 3))[0, 0]
    assert corner[0, 0] == 0 and corner[2, 2] == 1 and corner[3, 3] == 1 and corner[0, 3] == 1


def test_downsample_mask_majority():
    small = downsample_mask(_square(), (4, 4))[0, 0]
    expected = torch.zeros(4, 4)
    expected[1:3, 1:3] = 1
    assert torch.equal(small, expected)
    # a 2x2 block with one lesion pixel of four (25 %) stays background, two of four (50 %) becomes lesion
    m = torch.zeros(1, 1, 4, 4)
    m[..., 0, 0] = 1
    m[..., 2, 2:4] = 1
    assert downsample_mask(m, (2, 2))[0, 0].tolist() == [[0, 0], [0, 1]]


def _hand_made_case():
    """Square lesion in an 8x8 image: perfect segmentation logits, edge logits 0 (p = 0.5 everywhere), auxiliary
    logits 0 at 4x4 (p = 0.5 for both classes)."""
    label = _square()
    seg = torch.cat([(1 - label) * 40 - 20, label * 40 - 20], dim=1)  # +-20: softmax is 0/1 to 1e-17
    out = {"seg": seg, "edge": torch.zeros(1, 1, 8, 8), "aux": [torch.zeros(1, 2, 4, 4)]}
    return out, label


def test_co_supervision_loss_terms_by_hand():
    out, label = _hand_made_case()
    loss = CoSupervisionLoss(edge_weight=0.5, aux_weight=0.25)
    t = loss.terms(out, label)
    assert set(t) == {"seg", "edge", "aux"}
    assert float(t["seg"]) == pytest.approx(0.0, abs=1e-5)
    # edge target: 32 boundary pixels of 64; p = 0.5 -> Dice loss 1 - 2*16 / (32 + 32) = 0.5, BCE = ln 2
    assert float(t["edge"]) == pytest.approx(0.5 + math.log(2), abs=1e-5)
    # auxiliary target at 4x4: 4 lesion, 12 background pixels; p = 0.5 for both classes ->
    # Dice loss mean(1 - 4/(8+4), 1 - 12/(8+12)) = mean(2/3, 0.4), cross-entropy ln 2
    assert float(t["aux"]) == pytest.approx((2 / 3 + 0.4) / 2 + math.log(2), abs=1e-5)
    total = float(loss(out, label))
    assert total == pytest.approx(float(t["seg"]) + 0.5 * float(t["edge"]) + 0.25 * float(t["aux"]), abs=1e-6)


def test_zero_weights_and_missing_heads_remove_terms():
    out, label = _hand_made_case()
    no_edge = CoSupervisionLoss(edge_weight=0.0, aux_weight=1.0)
    assert set(no_edge.terms(out, label)) == {"seg", "aux"}
    assert float(no_edge(out, label)) == pytest.approx(float(no_edge.terms(out, label)["aux"]), abs=1e-5)
    no_aux = CoSupervisionLoss(edge_weight=1.0, aux_weight=0.0)
    assert float(no_aux(out, label)) == pytest.approx(0.5 + math.log(2), abs=1e-5)
    # the plain ResUnet output (a tensor, or a dict without edge/aux heads): segmentation term only
    plain = CoSupervisionLoss()
    assert float(plain(out["seg"], label)) == pytest.approx(0.0, abs=1e-5)
    assert set(plain.terms({"seg": out["seg"]}, label)) == {"seg"}


def test_loss_gradients_reach_every_head():
    torch.manual_seed(0)
    net = CoSupResUnet(channels=(4, 8, 16, 32)).train()
    label = (torch.rand(2, 1, 32, 32) > 0.7).float()
    CoSupervisionLoss()(net(torch.rand(2, 1, 32, 32)), label).backward()
    for name in ("edge_head", "aux_heads", "fusion_gate", "head"):
        grads = [p.grad for n, p in net.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), name


def test_floor_variant_trains_with_this_bundles_loss():
    """The stock MONAI UNet floor row of the CV (``crossval`` variant ``unet``) is built from this bundle's
    train.json and learns through its loss (a plain tensor: the segmentation term only)."""
    from monai.bundle import ConfigParser
    from monai.networks.nets import UNet

    from monai_covid.crossval import VARIANTS, _network_from_overrides

    net = _network_from_overrides(BUNDLE, VARIANTS[BUNDLE.name]["unet"]).train()
    assert isinstance(net, UNet)
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    loss_fn = parser.get_parsed_content("loss", instantiate=True)
    torch.manual_seed(0)
    x, label = torch.rand(2, 1, 64, 64), (torch.rand(2, 1, 64, 64) > 0.7).float()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = loss_fn(net(x), label)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert set(loss_fn.terms(net(x), label)) == {"seg"} and losses[-1] < losses[0]


def test_train_two_iterations_then_evaluate(shared_data, tmp_path):
    trainer = train_two_iterations_then_evaluate(BUNDLE, shared_data, tmp_path)
    # the training-mode dict went to the loss; the train metric ran on the segmentation head picked out of it
    assert trainer.state.output[0]["pred"].shape == (2, 128, 128)
    assert 0.0 <= trainer.state.metrics["train_mean_dice"] <= 1.0


def test_inference_on_real_slice(shared_data, tmp_path):
    # a training slice of the shipped model: the mask must overlap the radiologist's lesion mask substantially
    assert check_slice_inference(BUNDLE, shared_data, tmp_path) > 0.4


def test_inference_on_synthetic_nifti_preserves_geometry(tmp_path):
    hu, arr = check_nifti_geometry(BUNDLE, tmp_path, n=2, size=320)
    assert arr[hu > 0].sum() == 0  # lesions only inside the lung mask: body wall and air stay background


def test_monai_covid_infer_with_cosup(tmp_path):
    from monai_covid.cli import main

    inp = tmp_path / "in"
    inp.mkdir()
    img = sitk.GetImageFromArray(synthetic_ct(n=2, size=320).astype(np.int16))
    img.SetSpacing((0.9, 0.9, 5.0))
    sitk.WriteImage(img, str(inp / "synthetic_ct.nii.gz"))
    assert main(["infer", str(inp), str(tmp_path / "out"), "--quiet", "--models", "cosup"]) == 0
    seg = sitk.ReadImage(str(tmp_path / "out" / "synthetic_ct" / "lesion_seg.nii.gz"))
    assert seg.GetSize() == img.GetSize()
    assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1}
