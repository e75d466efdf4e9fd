"""The CXR infection-map bundle through monai.bundle's ConfigWorkflow on a few real shared X-rays."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from monai.bundle import ConfigWorkflow
from tests.bundle_run import run_inference

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "covid_cxr_infection_map_unet"
CONFIGS = BUNDLE / "configs"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_metadata_channels():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 1


def test_shipped_weights_fp16_within_budget():
    path = BUNDLE / "models" / "model.pt"
    assert path.stat().st_size < 6 * 2**20
    sd = torch.load(path, map_location="cpu", weights_only=True)
    floats = [v for v in sd.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)


def test_channels_last_network_gives_the_same_map():
    """inference.json keeps the weights in channels-last order on a CPU too (faster dense blocks); same output."""
    from monai.bundle import ConfigParser

    from monai_covid.inference.lesion import load_bundle_network

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    assert parser["channels_last"] is True
    net = load_bundle_network(BUNDLE, "cpu")

    def conv3x3(model):
        convs = (m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        return next(m for m in convs if m.in_channels > 1 and m.kernel_size == (3, 3))

    assert conv3x3(net).weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv3x3(net).weight.is_contiguous()
    plain = load_bundle_network(BUNDLE, "cpu").to(memory_format=torch.contiguous_format)
    assert conv3x3(plain).weight.is_contiguous()
    x = torch.rand(2, 1, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = net(x), plain(x)
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_train_two_iterations(shared_data, tmp_path):
    wf = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        workflow_type="train",
        bundle_root=str(BUNDLE),
        dataset_dir=str(shared_data),
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "eval"),
        # 4 training and 3 validation X-rays of every class; batch 2 -> 2 iterations
        train_datalist="$make_datalist('cxr_infection', @dataset_dir, fold=0, part='train')[::612]",
        val_datalist="$[next(d for d in make_datalist('cxr_infection', @dataset_dir, fold=0, part='val') if d['class_name'] == c) for c in ('covid', 'non_covid', 'normal')]",
        batch_size=2,
        max_epochs=1,
        image_size=[64, 64],
    )
    wf.initialize()
    get = wf.parser.get_parsed_content
    assert len(get("train_datalist")) == 4
    assert {d["class_name"] for d in get("val_datalist")} == {"covid", "non_covid", "normal"}
    wf.run()
    trainer = get("train#trainer")
    assert trainer.state.iteration == 2 and np.isfinite(float(trainer.state.output[0]["loss"]))
    dice = get("validate#evaluator").state.metrics["val_mean_dice"]
    assert 0.0 <= dice <= 1.0
    wf.finalize()
    sd = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert sd["encoder.conv0.weight"].dtype == torch.float16


def _input_folder(shared_data: Path, tmp_path: Path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    root = shared_data / "cxr_infection" / "train"
    for cls in ("covid", "normal"):
        shutil.copy(sorted((root / cls / "images").glob("*.png"))[0], src)
    # a smaller, non-square RGB JPEG of a real X-ray: outputs follow the input's size
    im = Image.open(sorted((root / "non_covid" / "images").glob("*.png"))[0]).convert("RGB").resize((200, 180))
    im.save(src / "rgb xray.jpg", quality=95)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return src


def test_inference_outputs(shared_data, tmp_path, capfd):
    src, out = _input_folder(shared_data, tmp_path), tmp_path / "out"
    before = sorted(p.name for p in src.iterdir())
    run_inference(BUNDLE, src, out)
    err = capfd.readouterr().err
    assert f"error: {src / 'broken.png'}" in err
    assert sorted(p.name for p in src.iterdir()) == before  # nothing written into the input folder

    from monai_covid.cxr_detector import bundle_detector

    from monai_covid.inference.lesion import load_bundle_network
    from monai_covid.infection_map import predict_cxr, read_xray

    det = bundle_detector(BUNDLE)
    net = load_bundle_network(BUNDLE, "cpu")
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "covid_probability", "covid_detected", "infected_area_percent"]
    assert sorted(r["image"] for r in rows) == sorted(p for p in before if p != "broken.png")
    for r in rows:
        stem = Path(r["image"]).stem
        size = Image.open(src / r["image"]).size
        seg_im, map_im = Image.open(out / f"{stem}_seg.png"), Image.open(out / f"{stem}_map.png")
        assert seg_im.size == map_im.size == size and seg_im.mode == "L" and map_im.mode == "RGBA"
        seg, rgba = np.asarray(seg_im), np.asarray(map_im)
        assert set(np.unique(seg)) <= {0, 255}
        p = float(r["covid_probability"])
        # the bundle's detector (inference.json "detector"): the calibrated map classifier when it ships one
        assert 0.0 <= p <= 1.0 and int(r["covid_detected"]) == int(p >= det.threshold)
        if det.rule == "paper":  # the paper's rule: COVID-19 exactly when a pixel is segmented
            assert int(r["covid_detected"]) == int(seg.max() == 255)
        # the same call as monai-covid infer's path (predict_cxr), whose detector may also read the encoder's pooled
        # features: the bundle's evaluator hands it those of its own forward pass
        want = predict_cxr(net, read_xray(src / r["image"]), detector=det)["covid_probability"]
        assert p == pytest.approx(want, abs=2e-3)
        assert float(r["infected_area_percent"]) == pytest.approx(100 * (seg > 0).mean(), abs=0.01)
        assert (rgba[seg > 0, 3] == 255).all()  # every segmented pixel is shown on the map
        grey = rgba[rgba[..., 3] == 0, :3]
        assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all()  # hidden pixels keep the X-ray


def test_evaluate_on_real_validation_images(shared_data, tmp_path):
    wf = ConfigWorkflow(
        config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")],
        meta_file=str(CONFIGS / "metadata.json"),
        workflow_type="eval",
        bundle_root=str(BUNDLE),
        dataset_dir=str(shared_data),
        output_dir=str(tmp_path),
        # 4 COVID and 3 control X-rays of grouped fold 0 (612 X-rays), which the shipped 0.3.0 model never saw
        val_datalist="$(lambda v: [d for d in v if d['covid']][::100] + [d for d in v if not d['covid']][::90])"
        "(make_datalist('cxr_infection_grouped', @dataset_dir, fold=0, part='val'))",
    )
    wf.initialize()
    wf.run()
    res = json.loads((tmp_path / "metrics.json").read_text())
    px, det = res["pixel_level_on_positive_images"], res["image_level_detection"]
    assert res["n_images"] == 7 and det["tp"] + det["fn"] == 4  # 4 COVID, 3 control X-rays in this subset
    assert px["n"] == 4 * 256 * 256  # pixels counted at the masks' own size
    assert px["f1_ci"] == pytest.approx(1.96 * np.sqrt(px["f1"] * (1 - px["f1"]) / px["n"]))
    # the shipped detector (evaluate.json "detector" = models/detector.json) makes the image-level calls
    assert res["detector"] == "logistic"
    # sanity floors, not figures (the bundle docs have those: 612 X-rays, CIs)
    assert px["f1"] > 0.35 and det["specificity"] >= 2 / 3
    assert res["ms_per_image"] > 0
