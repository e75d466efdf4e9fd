"""The CXR detector that also reads the network's encoder (issue 19): bottleneck choice, the forward hook, the PCA
features, the nested ``auto`` choice, and the embedding reaching the detector in ``predict_cxr`` and the writer."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from monai_covid import cxr_cv
from monai_covid.cxr_detector import CxrDetector, EmbeddingTap, find_embedding_layer
from monai_covid.networks.infection_unet import InfectionUNet
from tests.test_cxr_detector import _map, _synthetic_set

pytestmark = pytest.mark.usefixtures("one_thread")


def _slim() -> InfectionUNet:
    torch.manual_seed(0)
    return InfectionUNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        growth_rate=12,
        init_features=24,
        decoder_channels=[64, 48, 32, 16, 8],
    ).eval()


def test_bottleneck_layer_and_tap_pool_the_encoder_output() -> None:
    from monai.networks.layers import SkipConnection
    from monai.networks.nets import UNet

    net = _slim()
    assert find_embedding_layer(net) == "encoder_act"  # the DenseNet encoder's output, not a decoder reduction
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad(), EmbeddingTap(net, "encoder_act") as tap:
        net(x)
        expected = net.encode(x)[-1].mean(dim=(2, 3)).numpy()
    assert tap.value.shape == (2, 384)
    np.testing.assert_allclose(tap.value, expected, rtol=1e-5, atol=1e-6)
    net(x)  # the context removed the hook: a later pass does not touch the value
    np.testing.assert_allclose(tap.value, expected, rtol=1e-5, atol=1e-6)

    unet = UNet(2, 1, 1, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2).eval()
    name = find_embedding_layer(unet)
    assert isinstance(unet.get_submodule(name), SkipConnection)  # the bottom skip block: 128 + 256 channels
    tap = EmbeddingTap(unet, name).attach()
    with torch.no_grad():
        unet(torch.rand(1, 1, 64, 64))
    assert tap.value.shape == (1, 384)
    seen = []
    worker = threading.Thread(target=lambda: seen.append(tap.value))
    worker.start(), worker.join()
    assert seen == [None]  # per thread: another thread's inference does not read (or overwrite) this one
    tap.remove()


def _embedded_rows(seed: int, informative: bool, n: int = 40):
    """Map features that cannot separate the classes (one map for all) or can, and embeddings that can or cannot."""
    rng = np.random.default_rng(seed)
    feats, y, kinds = _synthetic_set(seed, n=n)
    y = np.asarray(y)
    emb = rng.normal(size=(len(y), 32))
    if informative:
        feats = [feats[0]] * len(y)  # the map says nothing
        emb[:, 3] += 3.0 * y  # the encoder does
    return feats, y, kinds, emb


def test_embedding_detector_reads_the_encoder_and_round_trips(tmp_path) -> None:
    from monai_covid.threshold_analysis import roc_auc

    feats, y, kinds, emb = _embedded_rows(1, informative=True)
    det = CxrDetector.fit(feats, y, kinds, embeddings=emb, n_components=8, embedding_layer="encoder_act")
    plain = CxrDetector.fit(feats, y, kinds)
    assert det.needs_embedding and not plain.needs_embedding
    assert det.features[-1] == "emb_7" and np.asarray(det.embedding_components).shape == (8, 32)
    t_feats, t_y, _, t_emb = _embedded_rows(2, informative=True)  # new X-rays
    assert roc_auc(t_y, det.probability(t_feats, t_emb)) > 0.95
    assert roc_auc(t_y, plain.probability(t_feats)) == pytest.approx(0.5)
    again = CxrDetector.load(det.save(tmp_path / "d.json"))
    np.testing.assert_allclose(again.probability(t_feats, t_emb), det.probability(t_feats, t_emb))
    one = again(_map(np.random.default_rng(0), "normal"), embedding=torch.as_tensor(t_emb[0]))
    assert 0.0 <= one["covid_probability"] <= 1.0
    with pytest.raises(ValueError, match="embedding"):
        again.probability(t_feats)
    with pytest.raises(ValueError, match="32"):
        again.probability(t_feats, t_emb[:, :16])
    with pytest.raises(ValueError, match="embedding_layer"):
        CxrDetector.fit(feats, y, kinds, embeddings=emb)


def _cv_rows(informative: bool) -> list[dict]:
    feats, y, kinds, emb = _embedded_rows(3, informative, n=80)
    rows = []
    for i, (f, c, kind) in enumerate(zip(feats, y, kinds)):
        r = {"fold": 0, "covid": int(c), "class_name": kind, "image": f"{i}.png", "group": f"g{i}"}
        r.update({f"{where}_{n}": v for n, v in f.items() for where in ("img", "lung")})
        r.update(_embedding=emb[i], _layer="encoder_act")
        rows.append(r)
    return rows


def test_auto_chooses_the_encoder_only_when_it_helps_on_its_own_rows() -> None:
    det = cxr_cv.choose_detector(_cv_rows(informative=True), 0.98)
    assert det.info["auto"]["chosen"] == "logistic_embed" and det.needs_embedding
    losses = det.info["auto"]["inner_log_loss"]
    assert losses["logistic_embed"] < losses["logistic_image"]
    det = cxr_cv.choose_detector(_cv_rows(informative=False), 0.98)  # maps separate, embeddings are noise
    assert det.info["auto"]["chosen"] == "logistic_image" and not det.needs_embedding


def test_report_scores_embedding_detectors_from_saved_embeddings(tmp_path) -> None:
    from monai_covid.io_utils import atomic_write_csv

    rows = _cv_rows(informative=True)
    work = tmp_path / "w"
    cxr_cv._save_embeddings(
        work / "toy" / "fold0" / "oof_embed.npz",
        [r["image"] for r in rows],
        np.stack([r["_embedding"] for r in rows]),
        "encoder_act",
    )
    plain = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    for r in plain:
        r.update(tp=10 * r["covid"], fp=1, fn=2 * r["covid"], tn=100, tp_lung=0, fp_lung=0, fn_lung=0)
    atomic_write_csv(work / "toy" / "oof.csv", plain, list(plain[0]))
    loaded = cxr_cv._read_oof(work / "toy")
    assert cxr_cv.attach_embeddings(loaded, work / "toy")
    np.testing.assert_allclose(loaded[5]["_embedding"], rows[5]["_embedding"], rtol=1e-6)
    per = cxr_cv.fold_metrics(loaded)
    by = {m["detector"]: m for m in per}
    assert set(by) == set(cxr_cv.DETECTORS) | set(cxr_cv.EMBED_DETECTORS)
    assert by["logistic_embed"]["det_auc"] > 0.9 > by["logistic_image"]["det_auc"]  # cross-fitted inside the fold
    table = cxr_cv.report(["toy"], work, tmp_path / "docs", "test", n_boot=20)
    assert "| auto |" in table and "| logistic_embed |" in table
    shipped = CxrDetector.load(work / "toy" / "detector_auto.json")
    assert shipped.needs_embedding and shipped.embedding_layer == "encoder_act"
    # without the embeddings of every X-ray, only the map detectors are reported
    (work / "toy" / "fold0" / "oof_embed.npz").unlink()
    assert not cxr_cv.attach_embeddings(cxr_cv._read_oof(work / "toy"), work / "toy")


def test_predict_and_writer_hand_the_same_pass_embedding_to_the_detector(tmp_path) -> None:
    from ignite.engine import Engine

    from monai_covid.infection_map import InfectionMapWriter, predict_cxr

    net = _slim()
    rng = np.random.default_rng(5)
    images = [rng.uniform(0, 1, (64, 64)).astype(np.float32) for _ in range(12)]
    embs, feats = [], []
    for im in images:
        with torch.no_grad(), EmbeddingTap(net, "encoder_act") as tap:
            net(torch.as_tensor(im)[None, None])
        embs.append(tap.value[0])
    from monai_covid.cxr_detector import map_features

    feats = [map_features(predict_cxr(net, im, image_size=(64, 64))["prob"]) for im in images]
    y = [1, 0] * 6
    det = CxrDetector.fit(feats, y, embeddings=np.stack(embs), n_components=4, embedding_layer="encoder_act")
    out = predict_cxr(net, images[0], image_size=(64, 64), detector=det)
    expected = det.probability([feats[0]], embs[0][None])[0]
    assert out["covid_probability"] == pytest.approx(expected, abs=1e-5)

    writer = InfectionMapWriter(tmp_path, detector=det)
    probs = {}

    def step(engine, batch):  # an evaluator's iteration: one forward pass of the batch, then the handlers
        x = torch.stack([torch.as_tensor(d["xray"]) for d in batch])
        with torch.no_grad():
            prob = torch.sigmoid(net(x))
        probs.update({d["name"]: prob[i] for i, d in enumerate(batch)})
        return [{"pred": prob[i], "xray": torch.as_tensor(d["xray"])} for i, d in enumerate(batch)]

    engine = Engine(step)
    writer.attach(engine)  # before engine.network exists, as in MONAI's evaluators
    engine.network = net
    batches = [[{"xray": images[i][None], "name": f"{i}.png"} for i in (j, j + 1)] for j in (0, 2)]
    engine.run(batches, max_epochs=1)
    assert len(writer.rows) == 4
    for i, row in enumerate(writer.rows):
        want = det(probs[f"{i}.png"].numpy(), embedding=embs[i])["covid_probability"]
        assert float(row["covid_probability"]) == pytest.approx(want, abs=1e-4)
    assert (tmp_path / "predictions.csv").is_file()
