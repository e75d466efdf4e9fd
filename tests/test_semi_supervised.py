"""Semi-supervised scheme of the CT lesion bundles (monai_covid.semi_supervised): pseudo-label loading (soft masks
kept soft, grouping by volume and patient) on the real files and synthetic cases, a short real pre-train ->
fine-tune -> resume run of both lesion bundles' train.json, and the one-run "mixed" stage (doctor and pseudo-labelled
slices in the same batches, the pseudo-labels drawn at a lower rate)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Compose
from PIL import Image

from data_prep.datalists import (
    PSEUDO_HOLDOUT_PATIENTS,
    ct_lesion_pseudo_datalist,
    make_datalist,
    pseudo_label_patient,
    pseudo_label_volume,
)
from data_prep.lesion_slices import load_transforms
from monai_covid.semi_supervised import (
    from_pretrained,
    latest_resume_checkpoint,
    read_epoch_metrics,
    score_pseudo_holdout,
    soft_dice,
    training_items,
    training_sampler,
    validation_items,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "name, volume, patient",
    [
        ("Data-1_coronacases_org_001_10.jpg", "Data-1_coronacases_org_001", "coronacases_001"),
        ("Data-1_coronacases_org_010_147.png", "Data-1_coronacases_org_010", "coronacases_010"),
        # two series of Radiopaedia case 29: two volumes, one patient
        (
            "Data-1_radiopaedia_org_covid-19-pneumonia-29_86490_1-dcm_5.jpg",
            "Data-1_radiopaedia_org_covid-19-pneumonia-29_86490_1-dcm",
            "radiopaedia_29",
        ),
        (
            "Data-1_radiopaedia_org_covid-19-pneumonia-29_86491_1-dcm_12.jpg",
            "Data-1_radiopaedia_org_covid-19-pneumonia-29_86491_1-dcm",
            "radiopaedia_29",
        ),
    ],
)
def test_volume_and_patient_from_name(name, volume, patient):
    assert pseudo_label_volume(name) == volume
    assert pseudo_label_patient(name) == patient


@pytest.mark.parametrize("name", ["0.jpg", "Data-1_coronacases_org_001.jpg", "other_source_3_4.jpg"])
def test_bad_pseudo_names_raise(name):
    with pytest.raises(ValueError, match=name.split(".")[0]):
        pseudo_label_patient(name)


def test_real_pseudo_datalist_groups_by_volume_and_patient(shared_data):
    items = ct_lesion_pseudo_datalist(shared_data)
    assert len(items) == 1600
    assert all(Path(d["label"]).parent.name == "soft_masks" and Path(d["label"]).is_file() for d in items[:20])
    assert len({d["volume"] for d in items}) == 20 and len({d["group"] for d in items}) == 18
    # the README's counts per volume
    per_volume = Counter(d["volume"] for d in items)
    assert per_volume["Data-1_coronacases_org_005"] == 166
    assert per_volume["Data-1_radiopaedia_org_covid-19-pneumonia-10_85902_3-dcm"] == 207
    train = make_datalist("ct_lesion_pseudo", shared_data, part="train")
    held = make_datalist("ct_lesion_pseudo", shared_data, part="val")
    assert len(train) + len(held) == 1600 and len(held) == 289
    assert {d["group"] for d in held} == set(PSEUDO_HOLDOUT_PATIENTS)
    # no volume and no patient on both sides
    assert not {d["volume"] for d in train} & {d["volume"] for d in held}
    assert not {d["group"] for d in train} & {d["group"] for d in held}
    # the scheme's stages: pre-training never sees a held-out patient nor a doctor slice; fine-tuning only doctor slices
    pre = training_items("pretrain", shared_data, fold=0)
    assert pre == train
    ft = training_items("finetune", shared_data, fold=0, repeats=4)
    assert len(ft) == 160 and all("pseudo_labelled" not in d["image"] for d in ft)
    val = validation_items("finetune", shared_data, fold=0)
    assert len(val) == 10 and all("pseudo_labelled" not in d["image"] for d in val)
    assert validation_items("pretrain", shared_data, fold=None) == held[::4]
    with pytest.raises(ValueError, match="stage"):
        training_items("semi", shared_data, fold=0)


def test_real_soft_mask_kept_soft(shared_data):
    item = make_datalist("ct_lesion_pseudo", shared_data, part="train")[0]
    raw = np.asarray(Image.open(item["label"]).convert("L"), dtype=np.float32) / 255.0
    assert 0 < np.count_nonzero((raw > 0) & (raw < 1))  # a probability map, not 0/255
    h, w = raw.shape
    soft = Compose(load_transforms((h, w), soft_label=True))(dict(item))["label"]
    hard = Compose(load_transforms((h, w)))(dict(item))["label"]
    values = torch.unique(soft)
    assert len(values) > 10 and 0.0 <= float(values.min()) and float(values.max()) <= 1.0
    # at the native size the soft label is the file's probability map, the hard one its threshold at 128
    np.testing.assert_allclose(soft[0].numpy(), raw, atol=1e-5)
    np.testing.assert_array_equal(hard[0].numpy(), (raw >= 128 / 255).astype(np.float32))
    # resized, the soft label keeps its lesion mass
    soft256 = Compose(load_transforms((256, 256), soft_label=True))(dict(item))["label"]
    assert abs(float(soft256.mean()) - raw.mean()) < 0.01


def test_synthetic_soft_mask_threshold_at_128(tmp_path):
    mask = np.array([[0, 64, 127, 128], [200, 255, 0, 0]], dtype=np.uint8)
    Image.fromarray(mask).save(tmp_path / "m.png")
    Image.fromarray(np.full_like(mask, 90)).save(tmp_path / "i.png")
    item = {"image": str(tmp_path / "i.png"), "label": str(tmp_path / "m.png")}
    soft = Compose(load_transforms(mask.shape, soft_label=True))(dict(item))["label"][0].numpy()
    hard = Compose(load_transforms(mask.shape))(dict(item))["label"][0].numpy()
    np.testing.assert_allclose(soft, mask / 255.0, atol=1e-6)
    np.testing.assert_array_equal(hard, [[0, 0, 0, 1], [1, 1, 0, 0]])


def test_soft_dice_hand_computed():
    pred = np.array([1, 1, 0, 0], dtype=bool)
    target = np.array([1.0, 0.5, 0.5, 0.0])
    assert soft_dice(pred, target) == pytest.approx(2 * 1.5 / (2 + 2.0))
    assert soft_dice(np.zeros(3, bool), np.zeros(3)) == 1.0
    assert soft_dice(np.zeros(3, bool), np.array([0, 0.2, 0])) == 0.0


def test_from_pretrained_loads_fp16_and_refuses_missing(tmp_path):
    from monai_covid.io_utils import save_fp16
    from monai_covid.networks.attention_segnet import AttentionSegNet

    src = AttentionSegNet(spatial_dims=2, in_channels=1, out_channels=2, channels=[4, 8, 16, 32, 64])
    save_fp16(src, tmp_path / "pre.pt")
    dst = AttentionSegNet(spatial_dims=2, in_channels=1, out_channels=2, channels=[4, 8, 16, 32, 64])
    assert from_pretrained(dst, None) is dst
    from_pretrained(dst, tmp_path / "pre.pt")
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert b.dtype == a.dtype, k
        torch.testing.assert_close(b, a.half().to(a.dtype))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        from_pretrained(dst, tmp_path / "missing.pt")


def test_read_epoch_metrics(tmp_path):
    log = tmp_path / "run.log"
    log.write_text(
        "2026-01-01 - INFO - Epoch: 1/2, Iter: 1/2 -- train_loss: 1.3 \n"
        "2026-01-01 - INFO - Epoch[1] Metrics -- val_mean_dice: 0.4000 val_sensitivity: 0.5000 \n"
        "2026-01-01 - INFO - Epoch[1] Metrics -- train_mean_dice: 0.2000 \n"
        "2026-01-01 - INFO - Epoch[2] Metrics -- val_mean_dice: 0.6500 val_sensitivity: 0.7000 \n"
    )
    rows = [r for r in read_epoch_metrics(log) if "val_mean_dice" in r]
    assert rows == [
        {"epoch": 1, "val_mean_dice": 0.4, "val_sensitivity": 0.5},
        {"epoch": 2, "val_mean_dice": 0.65, "val_sensitivity": 0.7},
    ]


def _workflow(repo_root, bundle_name, run_dir, **overrides):
    from monai.bundle import ConfigWorkflow

    bundle = repo_root / "bundles" / bundle_name
    # a few slices of each stage, small batches: the real pipeline, seconds not minutes
    ov = {
        "bundle_root": str(bundle),
        "ckpt_dir": str(run_dir),
        "output_dir": str(run_dir),
        "batch_size": 4,
        "max_epochs": 1,
        "train_datalist": "$semi_supervised.training_items(@stage, @dataset_dir, @fold, @n_folds, @epoch_repeats, "
        "@pseudo_rewindow)[:8]",
        "val_datalist": "$semi_supervised.validation_items(@stage, @dataset_dir, @fold, @n_folds, "
        "rewindow=@pseudo_rewindow)[:3]",
        **overrides,
    }
    wf = ConfigWorkflow(config_file=str(bundle / "configs" / "train.json"), workflow_type="train", **ov)
    wf.initialize()
    return wf


@pytest.mark.parametrize("bundle_name", ["covid_ct_lesion_asegnet", "covid_ct_lesion_cosup_resunet"])
def test_pretrain_finetune_resume_real_run(shared_data, repo_root, tmp_path, bundle_name):
    """Both lesion bundles' train.json run the same scheme (one library, no copy): 2 iterations a stage."""
    data = str(shared_data)
    pre = _workflow(
        repo_root, bundle_name, tmp_path / "pre", dataset_dir=data, stage="pretrain", fold=None, pseudo_rewindow=True
    )
    pre_items = pre.parser.get_parsed_content("train_datalist")
    assert all("pseudo_labelled" in d["image"] for d in pre_items)
    assert all(len(d["grey_map"]) == 2 for d in pre_items)  # re-windowed per volume (train.json pseudo_rewindow)
    pre.run()
    pre.finalize()
    pre_ckpt = tmp_path / "pre" / "model_final.pt"
    assert pre_ckpt.is_file() and latest_resume_checkpoint(tmp_path / "pre").name == "resume_checkpoint_epoch=1.pt"
    pre_state = torch.load(pre_ckpt, weights_only=True)

    ft = _workflow(
        repo_root, bundle_name, tmp_path / "ft", dataset_dir=data, stage="finetune", fold=0, pretrain_ckpt=str(pre_ckpt)
    )
    net = ft.parser.get_parsed_content("network")
    for k, v in net.state_dict().items():  # fine-tuning starts from the pre-trained weights
        torch.testing.assert_close(v, pre_state[k])
    assert all("pseudo_labelled" not in d["image"] for d in ft.parser.get_parsed_content("train_datalist"))
    ft.run()
    ft.finalize()
    after = torch.load(tmp_path / "ft" / "model_final.pt", weights_only=True)
    assert any(not torch.equal(after[k], pre_state[k]) for k in pre_state)  # and it trained

    # resume: a second run with 2 epochs continues at epoch 2 from the epoch-1 checkpoint
    again = _workflow(
        repo_root,
        bundle_name,
        tmp_path / "ft",
        dataset_dir=data,
        stage="finetune",
        fold=0,
        pretrain_ckpt=str(pre_ckpt),
        max_epochs=2,
        resume=True,
    )
    seen = []
    trainer = again.parser.get_parsed_content("train#trainer")
    from ignite.engine import Events

    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: seen.append(e.state.epoch))
    again.run()
    assert seen == [2] and trainer.state.epoch == 2
    assert latest_resume_checkpoint(tmp_path / "ft").name == "resume_checkpoint_epoch=2.pt"

    # the weaker check: the pre-trained network against held-out patients' pseudo-labels, on the inference path
    net = again.parser.get_parsed_content("network_def", instantiate=True)
    net.load_state_dict(pre_state)
    rows = score_pseudo_holdout(net.eval(), data, every=60, rewindow=True)
    assert len(rows) == 5 and {r["patient"] for r in rows} <= set(PSEUDO_HOLDOUT_PATIENTS)
    assert all(0.0 <= r["dice"] <= 1.0 and 0.0 <= r["soft_dice"] <= 1.0 for r in rows)


def test_real_mixed_items_keep_folds_and_holdout_apart(shared_data):
    items = training_items("mixed", shared_data, fold=0, rewindow=True)
    doctor = [d for d in items if d["source"] == "doctor"]
    pseudo = [d for d in items if d["source"] == "pseudo"]
    assert len(doctor) == 40 and len(pseudo) == 1311 and len(items) == 1351
    assert {tuple(sorted(d)) for d in items} == {("grey_map", "image", "label", "source")}  # one batch can hold both
    assert all(d["grey_map"] == [1.0, 0.0] for d in doctor) and any(d["grey_map"] != [1.0, 0.0] for d in pseudo)
    held_doctor = {d["image"] for d in validation_items("mixed", shared_data, fold=0)}
    assert len(held_doctor) == 10 and not held_doctor & {d["image"] for d in items}  # no validation slice trains
    held_pseudo = {d["image"] for d in make_datalist("ct_lesion_pseudo", shared_data, part="val")}
    assert not held_pseudo & {d["image"] for d in pseudo}  # the 4 held-out pseudo patients stay out of CV folds
    every = training_items("mixed", shared_data, fold=None)  # the shipped model: all 50 + 1,600
    assert Counter(d["source"] for d in every) == {"doctor": 50, "pseudo": 1600}
    assert all(d["grey_map"] == [1.0, 0.0] for d in every)  # no re-windowing unless asked


def test_mixed_sampler_draws_pseudo_labels_at_their_share():
    items = [{"source": "doctor"}] * 40 + [{"source": "pseudo"}] * 1311
    sampler = training_sampler("mixed", items, pseudo_share=1 / 3, repeats=4)
    assert len(sampler) == 240  # 4 draws per doctor slice on average, a third of the draws pseudo-labelled
    torch.manual_seed(0)
    draws = [i for _ in range(50) for i in sampler]
    pseudo_rate = np.mean([items[i]["source"] == "pseudo" for i in draws])
    assert abs(pseudo_rate - 1 / 3) < 0.02
    per_doctor = Counter(i for i in draws if i < 40)
    assert len(per_doctor) == 40 and abs(np.mean(list(per_doctor.values())) / 50 - 4) < 0.3
    # another share moves the rate; 0 draws doctor slices only
    torch.manual_seed(0)
    low = training_sampler("mixed", items, pseudo_share=0.1, repeats=4)
    assert np.mean([items[i]["source"] == "pseudo" for _ in range(50) for i in low]) < 0.15
    assert all(i < 40 for i in training_sampler("mixed", items, pseudo_share=0.0, repeats=4))
    # the other stages shuffle in the data loader; bad input is refused
    assert training_sampler("supervised", items) is None and training_sampler("finetune", items) is None
    with pytest.raises(ValueError, match="pseudo_share"):
        training_sampler("mixed", items, pseudo_share=1.0)
    with pytest.raises(ValueError, match="doctor and pseudo"):
        training_sampler("mixed", items[:40], pseudo_share=0.3)


def test_distributed_mixed_sampler_splits_the_draws_over_ranks_at_the_same_share():
    """multi_gpu_train.json: each of 2 ranks draws half the epoch from its own half of the items, pseudo-labels at
    their share; the other stages get MONAI's DistributedSampler over the (repeated) items."""
    from monai.data import DistributedSampler, DistributedWeightedRandomSampler

    items = [{"source": "doctor"}] * 40 + [{"source": "pseudo"}] * 1311
    dataset = list(range(len(items)))
    seen = []
    for rank in (0, 1):
        sampler = training_sampler(
            "mixed", items, 1 / 3, 4, dataset=dataset, distributed=True, num_replicas=2, rank=rank
        )
        assert isinstance(sampler, DistributedWeightedRandomSampler) and len(sampler) == 120  # 240 draws / 2 ranks
        draws = []
        for epoch in range(40):
            sampler.set_epoch(epoch)
            draws += list(sampler)
        assert abs(np.mean([items[i]["source"] == "pseudo" for i in draws]) - 1 / 3) < 0.03
        seen.append(set(draws))
    assert len(seen[0] & set(range(40))) == 40 and len(seen[1] & set(range(40))) == 40  # every doctor slice, each rank
    plain = training_sampler("supervised", items[:40], dataset=dataset[:40], distributed=True, num_replicas=2, rank=1)
    assert isinstance(plain, DistributedSampler) and len(plain) == 20
    with pytest.raises(ValueError, match="dataset"):
        training_sampler("mixed", items, distributed=True, num_replicas=2, rank=0)


@pytest.mark.parametrize("bundle_name", ["covid_ct_lesion_asegnet", "covid_ct_lesion_cosup_resunet"])
def _edge_items_workflow(repo_root, bundle_name, tmp_path, shared_data, item_args: str, **overrides):
    """A bundle's train workflow on the first and last 4 of its training items (one epoch, seconds)."""
    return _workflow(
        repo_root,
        bundle_name,
        tmp_path,
        dataset_dir=str(shared_data),
        fold=0,
        train_datalist=f"$(lambda x: x[:4] + x[-4:])(semi_supervised.training_items({item_args}))",
        **overrides,
    )


def _run_recording_sources(wf, tmp_path):
    """Run ``wf``; the ``source`` of every item it trained on, the iteration losses, whether the weights changed."""
    from ignite.engine import Events

    trainer = wf.parser.get_parsed_content("train#trainer")
    before = {k: v.clone() for k, v in wf.parser.get_parsed_content("network").state_dict().items()}
    sources, losses = [], []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: sources.extend(d["source"] for d in e.state.batch))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"])))
    wf.run()
    after = torch.load(tmp_path / "model_final.pt", weights_only=True)
    return sources, losses, any(not torch.equal(after[k], before[k].to(after[k].dtype)) for k in after)


@pytest.mark.parametrize("bundle_name", ["covid_ct_lesion_asegnet", "covid_ct_lesion_cosup_resunet"])
def test_mixed_stage_real_run(shared_data, repo_root, tmp_path, bundle_name):
    """One real epoch of the mixed stage: batches hold doctor and pseudo-labelled slices, and the network trains."""
    wf = _edge_items_workflow(
        repo_root,
        bundle_name,
        tmp_path,
        shared_data,
        "@stage, @dataset_dir, @fold, @n_folds, @epoch_repeats, @pseudo_rewindow",
        stage="mixed",
        pseudo_rewindow=True,
    )
    loader = wf.parser.get_parsed_content("train#dataloader")
    assert isinstance(loader.sampler, torch.utils.data.WeightedRandomSampler) and len(loader.sampler) == 24
    sources, losses, trained = _run_recording_sources(wf, tmp_path)
    assert len(sources) == 24 and set(sources) == {"doctor", "pseudo"}
    assert all(np.isfinite(losses)) and trained


def test_real_negatives_are_p001_lesion_free_slices_as_segment_volume_sees_them(shared_data, tmp_path):
    """Issue 18 negatives: every 2nd slice of P001 without infection (radiologist slice labels), lung-box cropped and
    windowed exactly as segment_volume feeds a HU volume, with empty masks; normal001 stays out (the held-out check)."""
    from data_prep.datalists import ct_dicom_datalist, ct_lesion_negatives_datalist
    from data_prep.io import read_dicom_series
    from data_prep.lung import lung_mask
    from monai_covid.inference.lesion import HU_WINDOW, lung_bbox

    cache = tmp_path / "cache"
    items = ct_lesion_negatives_datalist(shared_data, cache_dir=cache)
    p001 = next(d for d in ct_dicom_datalist(shared_data) if d["series_id"] == "P001")
    free = sorted(i for i, infected in p001["slice_labels"].items() if not infected)
    assert [d["instance"] for d in items] == free[::2] and len(items) == 34
    assert {d["series_id"] for d in items} == {"P001"}
    assert all(Path(d["image"]).is_relative_to(cache) and Path(d["label"]).is_relative_to(cache) for d in items)

    vol = read_dicom_series(Path(p001["image"]))
    ys, xs = lung_bbox(lung_mask(vol.array, vol.spacing))
    z = list(vol.instance_numbers).index(items[10]["instance"])
    lo, hi = HU_WINDOW
    expected = np.round(np.clip((vol.array[z][ys, xs].astype(np.float32) - lo) / (hi - lo), 0, 1) * 255)
    image, mask = np.asarray(Image.open(items[10]["image"])), np.asarray(Image.open(items[10]["label"]))
    assert image.shape == mask.shape == expected.shape and image.shape != vol.array.shape[1:]  # cropped
    np.testing.assert_array_equal(image, expected.astype(np.uint8))
    assert all(not np.asarray(Image.open(d["label"])).any() for d in items)  # empty masks

    stamp = Path(items[0]["image"]).stat().st_mtime_ns  # written once, then reused
    assert ct_lesion_negatives_datalist(shared_data, cache_dir=cache)[0] == items[0]
    assert Path(items[0]["image"]).stat().st_mtime_ns == stamp


def test_real_training_items_with_negatives(shared_data):
    sup = training_items("supervised", shared_data, fold=0, repeats=4, negatives=True)
    assert Counter(d["source"] for d in sup) == {"doctor": 160, "negative": 34}  # negatives once an epoch
    every = training_items("supervised", shared_data, fold=None, repeats=4, negatives=True, negatives_every=1)
    assert Counter(d["source"] for d in every) == {"doctor": 200, "negative": 68}  # all lesion-free P001 slices
    assert {tuple(sorted(d)) for d in sup} == {("grey_map", "image", "label", "source")}
    held = {d["image"] for d in validation_items("supervised", shared_data, fold=0)}
    assert not held & {d["image"] for d in sup}
    assert (
        training_items("supervised", shared_data, fold=0, repeats=4)
        == make_datalist("ct_lesion_slices", shared_data, fold=0, part="train") * 4
    )  # off by default: the items are unchanged
    mixed = training_items("mixed", shared_data, fold=0, negatives=True)
    assert Counter(d["source"] for d in mixed) == {"doctor": 40, "negative": 34, "pseudo": 1311}
    sampler = training_sampler("mixed", mixed, pseudo_share=1 / 3, repeats=4)
    weights = sampler.weights.numpy()
    neg = np.array([d["source"] == "negative" for d in mixed])
    doc = np.array([d["source"] == "doctor" for d in mixed])
    assert np.allclose(weights[neg], weights[doc][0])  # drawn like doctor slices
    assert np.isclose(weights[~neg & ~doc].sum() / weights.sum(), 1 / 3)


def test_negatives_real_run(shared_data, repo_root, tmp_path):
    """One real epoch with doctor slices and HU negatives in the batches; the network trains on both."""
    wf = _edge_items_workflow(
        repo_root,
        "covid_ct_lesion_asegnet",
        tmp_path,
        shared_data,
        "@stage, @dataset_dir, @fold, @n_folds, @epoch_repeats, @pseudo_rewindow, @negatives",
        stage="supervised",
        negatives=True,
    )
    sources, losses, trained = _run_recording_sources(wf, tmp_path)
    assert Counter(sources) == {"doctor": 4, "negative": 4} and all(np.isfinite(losses)) and trained
