"""Semi-supervised training of the CT lesion bundles: pre-train on pseudo-labelled slices, fine-tune on the doctor's.

The scheme of Semi-Inf-Net (Fan et al., IEEE TMI 39(8) 2020, Sec. III-C), in two runs of the same ``train.json``:

1. ``"stage": "pretrain"``: the 1,311 pseudo-labelled slices of 14 of the 18 patients of COVID-SemiSeg's
   unlabelled set (``data_prep.datalists.ct_lesion_pseudo_datalist``; pseudo-label probability thresholded at 128
   of 255, the bundle's own loss), validated each epoch on every 4th slice of the 4 held-out patients
   (``PSEUDO_HOLDOUT_PATIENTS``).
2. ``"stage": "finetune"`` with ``"pretrain_ckpt"`` = the stage-1 weights: the 50 doctor-labelled slices (a CV
   fold's training part, or all of them), as in the supervised recipe. ``"stage": "supervised"`` with no
   ``pretrain_ckpt`` is the supervised recipe alone.

One-run alternative, ``"stage": "mixed"``: every batch is drawn from the doctor slices of the fold *and* the
pre-training patients' pseudo-labelled slices (all 1,600 when ``fold`` is None, for a shipped model), with the
pseudo-labels' lower weight given by how often they are drawn: ``pseudo_share`` of the draws (default 1/3, i.e.
half the weight of the doctor slices), and the doctor slices drawn ``epoch_repeats`` times an epoch on average as
in the supervised recipe (:func:`training_sampler`, a ``torch.utils.data.WeightedRandomSampler``). Validation stays
on the doctor slices of the fold.

Both CT lesion bundles read the stages from their ``train.json``::

    "train_datalist": "$semi_supervised.training_items(@stage, @dataset_dir, @fold, @n_folds, @epoch_repeats)",
    "val_datalist": "$semi_supervised.validation_items(@stage, @dataset_dir, @fold, @n_folds)",
    "network": "$semi_supervised.from_pretrained(@network_def, @pretrain_ckpt).to(@device)",
    "run": [..., "$semi_supervised.attach_checkpoints(@train#trainer, @ckpt_dir, @network, @optimizer,
                                                      @lr_scheduler, @resume)", ...]

``monai_covid.crossval --pretrain_epochs N`` runs stage 1 once per network and stage 2 per fold. The pseudo-labels
were made by an Inf-Net trained on all 50 doctor slices, so the teacher saw every CV validation fold: the CV of a
pre-trained model is not fully independent of its validation slices (as for Semi-Inf-Net itself).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "STAGES",
    "training_items",
    "training_sampler",
    "validation_items",
    "from_pretrained",
    "attach_checkpoints",
    "latest_resume_checkpoint",
    "score_pseudo_holdout",
    "soft_dice",
    "read_epoch_metrics",
]

STAGES = ("supervised", "pretrain", "finetune", "mixed")
#: every n-th held-out pseudo-label slice is validated after each pre-training epoch (neighbours are near-identical)
PRETRAIN_VAL_EVERY = 4


def _check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    return stage


def training_items(
    stage: str,
    data_dir: str | os.PathLike,
    fold: int | None,
    n_folds: int = 5,
    repeats: int = 1,
    rewindow: bool = False,
    negatives: bool = False,
    negatives_every: int = 2,
) -> list[dict[str, Any]]:
    """Training items of ``stage``: the pre-training patients' pseudo-labelled slices (once each: 1,311 slices are
    enough draws an epoch; ``rewindow``: each volume's grey scale mapped onto the doctor slices') or the doctor
    slices of the fold's training part, each ``repeats`` times. ``"mixed"``: the fold's doctor slices once each and
    the pre-training patients' pseudo-labelled slices (every patient's with ``fold=None``), all items with the same
    keys (``image``, ``label``, ``grey_map``, ``source`` ``"doctor"`` / ``"pseudo"``) so that one batch can hold
    both; :func:`training_sampler` draws them.

    ``negatives=True`` (``"supervised"``, ``"finetune"`` and ``"mixed"``) adds lesion-free HU slices with empty masks
    (:func:`data_prep.datalists.ct_lesion_negatives_datalist`: every ``negatives_every``-th lesion-free slice of P001
    (2: 34 slices, 1: all 68), lung-box
    cropped and windowed as at inference; ``source`` ``"negative"``), once each an epoch in the supervised stages
    (34 against 4 x 40 doctor draws in a CV fold); in ``"mixed"`` they are drawn like doctor slices. Every item
    then has the keys of the mixed stage.
    """
    from data_prep.datalists import ct_lesion_negatives_datalist, make_datalist

    if _check_stage(stage) == "pretrain":
        return make_datalist("ct_lesion_pseudo", data_dir, part="train", rewindow=rewindow)
    doctor = make_datalist("ct_lesion_slices", data_dir, fold=fold, n_folds=n_folds, part="train")
    if stage != "mixed" and not negatives:
        return doctor * int(repeats)

    def item(d: dict[str, Any], source: str) -> dict[str, Any]:
        return {
            "image": d["image"],
            "label": d["label"],
            "grey_map": list(d.get("grey_map", (1.0, 0.0))),
            "source": source,
        }

    negative = (
        [item(d, "negative") for d in ct_lesion_negatives_datalist(data_dir, every=negatives_every)]
        if negatives
        else []
    )
    if stage != "mixed":
        return [item(d, "doctor") for d in doctor] * int(repeats) + negative
    pseudo = make_datalist("ct_lesion_pseudo", data_dir, part="train" if fold is not None else "all", rewindow=rewindow)
    return [item(d, "doctor") for d in doctor] + negative + [item(d, "pseudo") for d in pseudo]


def _mixed_weights(items: Sequence[dict[str, Any]], pseudo_share: float, repeats: int) -> tuple[np.ndarray, int]:
    """Per-item draw weights of the ``"mixed"`` stage and the number of draws an epoch (see
    :func:`training_sampler`)."""
    share = float(pseudo_share)
    if not 0.0 <= share < 1.0:
        raise ValueError(f"pseudo_share must be in [0, 1), got {pseudo_share}")
    pseudo = np.array([d.get("source") == "pseudo" for d in items], dtype=bool)
    n_pseudo, n_doctor = int(pseudo.sum()), int((~pseudo).sum())
    if n_doctor == 0 or (share > 0 and n_pseudo == 0):
        raise ValueError(
            f"the mixed stage needs doctor and pseudo-labelled items (source 'doctor' / 'pseudo'), got {n_doctor} and "
            f'{n_pseudo}; to train on your own labelled slices only, set "stage": "supervised"'
        )
    weights = np.where(pseudo, share / max(n_pseudo, 1), (1.0 - share) / n_doctor)  # negatives: drawn like doctor
    return weights, int(round(n_doctor * int(repeats) / (1.0 - share)))


def training_sampler(
    stage: str,
    items: Sequence[dict[str, Any]],
    pseudo_share: float = 1 / 3,
    repeats: int = 4,
    dataset=None,
    distributed: bool = False,
    **distributed_kwargs,
):
    """The sampler of the training data loader.

    ``distributed=False`` (``train.json``): for the ``"mixed"`` stage a ``WeightedRandomSampler`` (with replacement)
    that gives the pseudo-labelled items ``pseudo_share`` of the draws and the doctor items the rest, an epoch being
    ``repeats`` draws per doctor item on average (``round(n_doctor * repeats / (1 - pseudo_share))`` draws); None for
    the other stages (the data loader shuffles).

    ``distributed=True`` (``multi_gpu_train.json``; ``dataset`` is the training dataset, ``distributed_kwargs`` go
    to the sampler, e.g. ``num_replicas`` and ``rank``): for ``"mixed"`` a
    ``monai.data.DistributedWeightedRandomSampler`` with the same weights and the epoch's draws split over the ranks
    (each rank draws from its own shuffled share of the items, so the pseudo-labels' share holds on average over the
    epoch, not exactly per rank); for the other stages ``monai.data.DistributedSampler`` (shuffled, evenly divisible).
    """
    mixed = _check_stage(stage) == "mixed"
    if distributed:
        from monai.data import DistributedSampler, DistributedWeightedRandomSampler

        if dataset is None:
            raise ValueError("distributed=True needs the training dataset")
        if not mixed:
            return DistributedSampler(dataset, even_divisible=True, shuffle=True, **distributed_kwargs)
        weights, n_draws = _mixed_weights(items, pseudo_share, repeats)
        sampler = DistributedWeightedRandomSampler(dataset, weights.tolist(), even_divisible=True, **distributed_kwargs)
        sampler.num_samples_per_rank = -(-n_draws // sampler.num_replicas)
        return sampler
    if not mixed:
        return None
    import torch

    weights, n_draws = _mixed_weights(items, pseudo_share, repeats)
    return torch.utils.data.WeightedRandomSampler(
        torch.as_tensor(weights, dtype=torch.double), n_draws, replacement=True
    )


def validation_items(
    stage: str,
    data_dir: str | os.PathLike,
    fold: int | None,
    n_folds: int = 5,
    every: int = PRETRAIN_VAL_EVERY,
    rewindow: bool = False,
) -> list[dict[str, Any]]:
    """Validation items of ``stage``: every ``every``-th slice of the held-out pseudo-label patients, or the
    doctor slices of the fold (all 50 with ``fold=None``)."""
    from data_prep.datalists import make_datalist

    if _check_stage(stage) == "pretrain":
        return make_datalist("ct_lesion_pseudo", data_dir, part="val", rewindow=rewindow)[::every]
    return make_datalist("ct_lesion_slices", data_dir, fold=fold, n_folds=n_folds, part="val")


def from_pretrained(network, ckpt: str | os.PathLike | None):
    """``network`` with the weights of ``ckpt`` (a state_dict file, fp32 or fp16, all keys must match) loaded, or
    unchanged when ``ckpt`` is None/empty. A missing file is an error (a fine-tune must not silently start from
    scratch)."""
    if not ckpt:
        return network
    import torch

    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pre-trained checkpoint not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = network.state_dict()
    network.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in state.items()})
    return network


_RESUME_PREFIX = "resume"


def latest_resume_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest per-epoch resume checkpoint in ``ckpt_dir`` (``resume_checkpoint_epoch=N.pt``), or None."""
    found = []
    for p in Path(ckpt_dir).glob(f"{_RESUME_PREFIX}_checkpoint_epoch=*.pt"):
        m = re.search(r"epoch=(\d+)\.pt$", p.name)
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def attach_checkpoints(trainer, ckpt_dir: str, network, optimizer, lr_scheduler, resume: bool = False) -> None:
    """Checkpoint ``trainer`` every epoch (network, optimizer, scheduler, trainer state: one file kept) and write the
    last epoch's network as ``model_final.pt`` (a plain state_dict, the fixed-epoch model the CV scores); with
    ``resume`` and a checkpoint in ``ckpt_dir``, continue from it (same epoch, lr and optimizer state)."""
    from monai.handlers import CheckpointLoader, CheckpointSaver

    state = {"model": network, "optimizer": optimizer, "lr_scheduler": lr_scheduler, "trainer": trainer}
    if resume:
        last = latest_resume_checkpoint(ckpt_dir)
        if last is not None:
            CheckpointLoader(load_path=str(last), load_dict=state, map_location="cpu").attach(trainer)
    CheckpointSaver(
        save_dir=ckpt_dir, save_dict=state, file_prefix=_RESUME_PREFIX, save_interval=1, epoch_level=True, n_saved=1
    ).attach(trainer)
    CheckpointSaver(
        save_dir=ckpt_dir, save_dict={"model": network}, save_final=True, final_filename="model_final.pt"
    ).attach(trainer)


def soft_dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of a binary prediction against a soft target in [0, 1]: ``2 sum(p q) / (sum p + sum q)`` (1 when both
    are empty)."""
    p = np.asarray(pred, dtype=np.float64)
    q = np.asarray(target, dtype=np.float64)
    den = p.sum() + q.sum()
    return float(2.0 * (p * q).sum() / den) if den > 0 else 1.0


def score_pseudo_holdout(
    net, data_dir: str | os.PathLike, every: int = 1, threshold: float = 0.5, rewindow: bool = False
) -> list[dict[str, Any]]:
    """Per-slice scores of ``net`` against the pseudo-labels of the held-out patients (every ``every``-th slice), at
    the slices' original size through the inference path: Dice against the pseudo-label thresholded at 128 of 255
    and soft Dice against the probability map. A weaker check than the doctor folds: the labels are a model's.
    ``rewindow``: the slices are re-windowed per volume first, as in training with ``pseudo_rewindow``."""
    from PIL import Image

    from data_prep.datalists import make_datalist
    from data_prep.lesion_slices import GreyLevelMap
    from monai_covid.crossval import per_image_scores
    from monai_covid.inference.lesion import segment_slices

    items = make_datalist("ct_lesion_pseudo", data_dir, part="val", rewindow=rewindow)[::every]
    images = [np.asarray(Image.open(i["image"]).convert("L"), dtype=np.float32) / 255.0 for i in items]
    images = [GreyLevelMap(*i.get("grey_map", (1.0, 0.0)))(x) for i, x in zip(items, images)]
    soft = [np.asarray(Image.open(i["label"]).convert("L"), dtype=np.float32) / 255.0 for i in items]
    preds = segment_slices(net, images, threshold=threshold)
    rows = []
    for i, p, q in zip(items, preds, soft):
        s = per_image_scores(p, q >= 128 / 255)
        rows.append(
            {
                "volume": i["volume"],
                "patient": i["group"],
                "image": Path(i["image"]).name,
                **s,
                "soft_dice": soft_dice(p > 0, q),
            }
        )
    return rows


_EPOCH_METRIC = re.compile(r"Epoch\[(\d+)\] Metrics -- (.*)$")


def read_epoch_metrics(log_path: str | os.PathLike) -> list[dict[str, float]]:
    """Validation metrics per epoch from a training log (``StatsHandler`` lines ``Epoch[N] Metrics -- k: v ...``)."""
    rows = []
    for line in Path(log_path).read_text(errors="replace").splitlines():
        m = _EPOCH_METRIC.search(line)
        if m:
            row: dict[str, float] = {"epoch": int(m.group(1))}
            for k, v in re.findall(r"(\w+): ([-\d.eE+naNif]+)", m.group(2)):
                row[k] = float(v)
            rows.append(row)
    return rows
