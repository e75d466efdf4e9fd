"""Training the ResNeXt+ volume detector from every labelled CT source we have: a slice table, grouped folds, MIL
bags, the two training stages and the slice-threshold rule (issue 21).

Why this scheme (the paper trains end to end on 302 labelled volumes; we have two real HU series):

- **Slice table** (:func:`build_slice_table`): every slice of every set, pre-processed once to the detector's input
  (tone-mapped display-scale image + lung mask, ``size`` px) with a slice label, a *group* (the volume, patient or
  near-duplicate group it belongs to) and its axial position when the group is an ordered volume.
  Positives: the 1,600 pseudo-labelled slices of 20 COVID-19 volumes (``ct_lesion_slices/pseudo_labelled``; each
  carries a lesion), the doctor-labelled lesion slices with a lesion (``ct_lesion_slices/train``), COVID slices of
  ``ct_slices_cls`` and ``ct_slices_ucsd/val``. Negatives: non-COVID slices of those two sets and every slice of
  the normal series ``normal001``. ``P001`` is in the table with ``label = -1``: its radiologist slice labels are
  kept apart in ``eval_label`` and are never a training target.
- **Grouped folds** (:func:`assign_folds`): a group (volume / patient / near-duplicate group) lies in exactly one
  fold; :func:`check_disjoint` is the guard the training code and the tests call.
- **Bags** (:class:`BagBuilder`): positive bags are an ordered run of one COVID-19 volume's slices inside a run of
  lesion-free slices (``normal001`` when it is a training volume, otherwise non-COVID 2D slices), or COVID 2D slices
  among non-COVID ones; negative bags are a run of ``normal001``, non-COVID 2D slices, or both mixed. Every slice of
  a bag keeps its own label (``-1`` for a slice whose label is unknown, e.g. P001 in the shipped training).
- **Stage 1** (:func:`pretrain_encoder`): encoder (lung-mask stem, CBAM, ResNeXt trunk) + head on single slices,
  class-balanced draws, flips / gamma / contrast augmentation.
- **Stage 2** (:func:`train_mil_head`): the encoder is frozen, every slice is encoded once, and the BiLSTM, slice
  attention and head are trained on bags of features with :class:`monai_covid.volume_detector.MILLoss` (volume
  cross-entropy + slice BCE on known slice labels + max-slice BCE for positive bags).
- **Slice threshold** (:func:`threshold_at_fpr`): the lowest threshold whose false-positive slice rate on the
  negative slices of *training* bags is at most ``max_fpr`` (5 %).
"""

from __future__ import annotations

import csv
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "SliceTable",
    "build_slice_table",
    "pseudo_volume_id",
    "assign_folds",
    "check_disjoint",
    "BagBuilder",
    "augment_slices",
    "pretrain_encoder",
    "encode_slices",
    "train_mil_head",
    "score_bags",
    "threshold_at_fpr",
    "volume_threshold_from_bags",
    "train_detector",
    "fit_and_save",
    "wilson_ci",
    "block_bootstrap_f1",
]


# ------------------------------------------------------------------------------------------------- slice table


def pseudo_volume_id(name: str) -> tuple[str, int]:
    """``Data-1_coronacases_org_001_47.jpg`` -> (``Data-1_coronacases_org_001``, 47): volume id and slice number."""
    stem = Path(name).stem
    m = re.match(r"^(.*)_(\d+)$", stem)
    if not m:
        raise ValueError(f"{name}: no '<volume>_<slice>' name")
    return m.group(1), int(m.group(2))


class SliceTable:
    """Pre-processed slices with labels and groups (all arrays have one row per slice).

    ``x`` (N, 2, s, s) float16; ``label`` (N,) int8 training label (1 COVID / lesion, 0 negative, -1 unknown);
    ``eval_label`` (N,) int8 (P001's radiologist labels; equal to ``label`` elsewhere); ``group`` (N,) str;
    ``source`` (N,) str; ``order`` (N,) int (axial position within an ordered volume, -1 for loose 2D slices);
    ``volume_label`` dict group -> 0/1 for the real and pseudo-labelled volumes.
    """

    def __init__(self, x, label, eval_label, group, source, order, volume_label: dict[str, int]) -> None:
        self.x = torch.as_tensor(x)
        self.label = np.asarray(label, dtype=np.int8)
        self.eval_label = np.asarray(eval_label, dtype=np.int8)
        self.group = np.asarray(group, dtype=object)
        self.source = np.asarray(source, dtype=object)
        self.order = np.asarray(order, dtype=np.int64)
        self.volume_label = dict(volume_label)
        n = len(self.label)
        if not (self.x.shape[0] == len(self.eval_label) == len(self.group) == len(self.source) == len(self.order) == n):
            raise ValueError("slice table arrays differ in length")

    def __len__(self) -> int:
        return len(self.label)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "x.npy", self.x.numpy())
        np.savez(
            folder / "meta.npz", label=self.label, eval_label=self.eval_label, group=self.group.astype(str),
            source=self.source.astype(str), order=self.order,
            vol_names=np.asarray(list(self.volume_label), dtype=str), vol_labels=np.asarray(list(self.volume_label.values())),
        )
        return folder

    @classmethod
    def load(cls, folder: str | Path, mmap: bool = False) -> SliceTable:
        folder = Path(folder)
        x = np.load(folder / "x.npy", mmap_mode="r" if mmap else None)
        m = np.load(folder / "meta.npz", allow_pickle=False)
        vol = {str(k): int(v) for k, v in zip(m["vol_names"], m["vol_labels"])}
        return cls(torch.from_numpy(np.ascontiguousarray(x)), m["label"], m["eval_label"], m["group"].astype(object),
                   m["source"].astype(object), m["order"], vol)

    def subset(self, idx: np.ndarray) -> SliceTable:
        idx = np.asarray(idx)
        keep = set(self.group[idx].tolist())
        return SliceTable(self.x[torch.as_tensor(idx)], self.label[idx], self.eval_label[idx], self.group[idx],
                          self.source[idx], self.order[idx], {g: v for g, v in self.volume_label.items() if g in keep})

    def indices(self, groups: Iterable[str]) -> np.ndarray:
        return np.flatnonzero(np.isin(self.group, list(groups)))

    def equalized(self) -> SliceTable:
        """The same table with every slice's image histogram-equalised
        (:func:`monai_covid.volume_detector.equalize_slices`)."""
        from monai_covid.volume_detector import equalize_slices

        return SliceTable(equalize_slices(self.x), self.label, self.eval_label, self.group, self.source, self.order,
                          self.volume_label)


def _read_gray(path: str | Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def build_slice_table(
    data_dir: str | Path,
    size: int = 128,
    sources: Sequence[str] = ("pseudo", "lesion_train", "cls", "ucsd", "ct_dicom"),
    limit: int | dict[str, int] | None = None,
    verbose: bool = True,
) -> SliceTable:
    """Read and pre-process every slice of the named sources (see the module docstring). ``limit`` keeps the first
    ``limit`` items of each 2D source, or ``limit[source]`` of the sources named in a dict (tests)."""
    from data_prep import datalists as dl
    from data_prep import near_duplicates as nd
    from data_prep.io import read_volume
    from data_prep.lung import lung_mask
    from monai_covid.volume_detector import preprocess_slice_8bit, preprocess_volume

    data_dir = Path(data_dir)
    limits = limit if isinstance(limit, dict) else {s: limit for s in ("pseudo", "lesion_train", "cls", "ucsd")}
    xs: list[torch.Tensor] = []
    rows: list[tuple[int, int, str, str, int]] = []  # label, eval_label, group, source, order
    vols: dict[str, int] = {}
    t0 = time.time()

    def add_2d(paths: Sequence[str], labels: Sequence[int], groups: Sequence[str], src: str, orders: Sequence[int]) -> None:
        for p, y, g, o in zip(paths, labels, groups, orders):
            xs.append(preprocess_slice_8bit(_read_gray(p), size)[None].half())
            rows.append((int(y), int(y), g, src, int(o)))
        if verbose:
            print(f"{src}: {len(paths)} slices ({time.time() - t0:.0f} s)", flush=True)

    if "pseudo" in sources:
        files = sorted((data_dir / "ct_lesion_slices" / "pseudo_labelled" / "images").glob("*.jpg"))
        ids = [pseudo_volume_id(f.name) for f in files]
        order = sorted(range(len(files)), key=lambda i: ids[i])
        if limits.get("pseudo"):
            order = order[: limits["pseudo"]]
        add_2d([str(files[i]) for i in order], [1] * len(order), [ids[i][0] for i in order], "pseudo",
               [ids[i][1] for i in order])
        vols.update({ids[i][0]: 1 for i in order})
    if "lesion_train" in sources:
        items = dl.ct_lesion_datalist(data_dir)[: limits.get("lesion_train") or None]
        thumbs = nd.thumbnails([d["image"] for d in items])
        groups = nd.group_near_duplicates(nd.ncc_matrix(thumbs))
        labels = [int(_read_gray(d["label"]).max() > 0) for d in items]
        add_2d([d["image"] for d in items], labels, [f"medseg_g{g:03d}" for g in groups], "lesion_train", [-1] * len(items))
    if "cls" in sources:
        items = dl.ct_slices_cls_grouped_datalist(data_dir)
        limit = limits.get("cls")
        if limit:
            items = [d for d in items if d["label"] == 1][: limit // 2] + [d for d in items if d["label"] == 0][: limit - limit // 2]
        add_2d([d["image"] for d in items], [d["label"] for d in items], [f"cls_{d['group']}" for d in items], "cls",
               [-1] * len(items))
    if "ucsd" in sources:
        items = dl.ct_slices_ucsd_datalist(data_dir, "val")
        limit = limits.get("ucsd")
        if limit:
            items = [d for d in items if d["label"] == 1][: limit // 2] + [d for d in items if d["label"] == 0][: limit - limit // 2]
        add_2d([d["image"] for d in items], [d["label"] for d in items], [f"ucsd_{d['group']}" for d in items], "ucsd",
               [-1] * len(items))
    if "ct_dicom" in sources:
        for d in dl.ct_dicom_datalist(data_dir):
            vol = read_volume(d["image"])
            lung = lung_mask(vol.array, vol.spacing)
            x = preprocess_volume(vol.array, lung, size=size).half()
            truth = [int(d["slice_labels"].get(i, 0)) for i in vol.instance_numbers]
            # P001's slice labels are for evaluation only; a negative volume's slices are negative by its diagnosis
            train = [-1] * len(truth) if d["label"] == 1 else [0] * len(truth)
            xs.append(x)
            rows += [(t, e, d["series_id"], "ct_dicom", z) for z, (t, e) in enumerate(zip(train, truth))]
            vols[d["series_id"]] = int(d["label"])
            if verbose:
                print(f"{d['series_id']}: {len(truth)} slices ({time.time() - t0:.0f} s)", flush=True)
    label, eval_label, group, source, order = zip(*rows)
    return SliceTable(torch.cat(xs), label, eval_label, group, source, order, vols)


# ------------------------------------------------------------------------------------------------------- folds


def assign_folds(
    groups: Sequence[str], labels: Sequence[int], n_folds: int = 4, fixed: dict[str, Any] | None = None, seed: int = 0
) -> dict[str, int]:
    """Fold of every group: whole groups, balanced by positive and negative slice counts (greedy, largest first).

    ``fixed`` pins groups to a fold (an int) or keeps them out of every fold (``None``: e.g. P001, which is only
    ever a validation volume, or normal001 when it is handled per fold by the caller).
    """
    fixed = dict(fixed or {})
    rng = np.random.default_rng(seed)
    g_arr, y_arr = np.asarray(groups, dtype=object), np.asarray(labels)
    names = sorted(set(g_arr.tolist()) - set(fixed))
    counts = {g: (int((y_arr[g_arr == g] == 1).sum()), int((y_arr[g_arr == g] == 0).sum())) for g in names}
    rng.shuffle(names)
    names.sort(key=lambda g: -sum(counts[g]))
    load = np.zeros((n_folds, 2))
    out: dict[str, int] = {g: f for g, f in fixed.items() if f is not None}
    for g in names:
        p, n = counts[g]
        cost = [(load[f, 0] + p) ** 2 + (load[f, 1] + n) ** 2 for f in range(n_folds)]
        f = int(np.argmin(cost))
        load[f] += (p, n)
        out[g] = f
    return out


def check_disjoint(train_groups: Iterable[str], val_groups: Iterable[str]) -> None:
    """Raise if a group (volume / patient / near-duplicate group) is on both sides of a split."""
    both = set(train_groups) & set(val_groups)
    if both:
        raise ValueError(f"groups in both training and validation: {sorted(both)[:5]}")


# -------------------------------------------------------------------------------------------------------- bags


class BagBuilder:
    """Bags of slice indices into one :class:`SliceTable` (restricted to ``idx``, the training rows).

    ``sample(rng)`` returns ``(slice indices (n,), bag label, slice labels (n,))``; kinds cycle between positive
    and negative bags (see the module docstring). ``max_slices`` bounds a bag; ``min_slices`` the lower end.
    ``real_volume_share``: the share of positive-volume bags drawn from real HU series (source ``ct_dicom``, i.e.
    P001 when it is a training volume) instead of uniformly over all positive volumes (0: uniform).
    """

    def __init__(
        self, table: SliceTable, idx: np.ndarray, max_slices: int = 48, min_slices: int = 12, real_volume_share: float = 0.0
    ) -> None:
        self.table = table
        idx = np.asarray(idx)
        self.max_slices, self.min_slices = max_slices, min_slices
        self.real_volume_share = float(real_volume_share)
        lab, src, grp = table.label[idx], table.source[idx], table.group[idx]
        ordered = table.order[idx] >= 0
        self.pos_volumes: dict[str, np.ndarray] = {}
        self.neg_volumes: dict[str, np.ndarray] = {}
        for g in sorted(set(grp[ordered].tolist())):
            rows = idx[(grp == g) & ordered]
            rows = rows[np.argsort(table.order[rows], kind="stable")]
            (self.pos_volumes if table.volume_label.get(g, 0) == 1 else self.neg_volumes)[g] = rows
        self.pos_2d = idx[(~ordered) & (lab == 1)]
        self.neg_2d = idx[(~ordered) & (lab == 0)]
        self.kinds = []
        if self.pos_volumes:
            self.kinds += ["pos_volume", "pos_volume"]
        if len(self.pos_2d) and (len(self.neg_2d) or self.neg_volumes):
            self.kinds.append("pos_2d")
        if self.neg_volumes:
            self.kinds.append("neg_volume")
        if len(self.neg_2d):
            self.kinds.append("neg_2d")
        if self.neg_volumes and len(self.neg_2d):
            self.kinds.append("neg_mixed")
        if not self.kinds:
            raise ValueError("no bag can be built from these slices")
        self.groups = set(grp.tolist())
        self.real_pos = [g for g, rows in self.pos_volumes.items() if table.source[rows[0]] == "ct_dicom"]

    def _negatives(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` lesion-free slices: a run of a negative volume when there is one (half the time), else 2D ones."""
        if self.neg_volumes and (not len(self.neg_2d) or rng.random() < 0.5):
            rows = list(self.neg_volumes.values())[rng.integers(len(self.neg_volumes))]
            n = min(n, len(rows))
            s = rng.integers(0, len(rows) - n + 1)
            return rows[s : s + n]
        return rng.choice(self.neg_2d, size=n, replace=len(self.neg_2d) < n)

    def sample(self, rng: np.random.Generator, kind: str | None = None) -> tuple[np.ndarray, int, np.ndarray]:
        kind = kind or self.kinds[rng.integers(len(self.kinds))]
        n = int(rng.integers(self.min_slices, self.max_slices + 1))
        lab = self.table.label
        if kind == "pos_volume":
            if self.real_volume_share > 0 and self.real_pos and rng.random() < self.real_volume_share:
                rows = self.pos_volumes[self.real_pos[rng.integers(len(self.real_pos))]]
            else:
                rows = list(self.pos_volumes.values())[rng.integers(len(self.pos_volumes))]
            k = int(min(len(rows), rng.integers(max(2, n // 8), max(3, (3 * n) // 4))))
            s = rng.integers(0, len(rows) - k + 1)
            pos = rows[s : s + k]
            if len(self.neg_2d) or self.neg_volumes:
                neg = self._negatives(n - k, rng)
                cut = int(rng.integers(0, len(neg) + 1))  # the lesion run sits inside the lesion-free run
                bag = np.concatenate([neg[:cut], pos, neg[cut:]])
            else:
                bag = pos
            return bag, 1, lab[bag].astype(np.int64)
        if kind == "pos_2d":
            k = int(rng.integers(1, max(2, n // 2)))
            extra = rng.choice(self.pos_2d, size=k, replace=len(self.pos_2d) < k)
            bag = self._insert(self._negatives(n - k, rng), extra, rng)
            return bag, 1, lab[bag].astype(np.int64)
        if kind == "neg_volume":
            bag = self._negatives_run(n, rng)
        elif kind == "neg_2d":
            bag = rng.choice(self.neg_2d, size=n, replace=len(self.neg_2d) < n)
        else:  # neg_mixed
            run = self._negatives_run(n, rng)
            k = int(rng.integers(1, max(2, len(run) // 2)))
            bag = self._insert(run, rng.choice(self.neg_2d, size=k, replace=len(self.neg_2d) < k), rng, replace=True)
        return bag, 0, lab[bag].astype(np.int64)

    def _negatives_run(self, n: int, rng: np.random.Generator) -> np.ndarray:
        rows = list(self.neg_volumes.values())[rng.integers(len(self.neg_volumes))]
        n = min(n, len(rows))
        s = rng.integers(0, len(rows) - n + 1)
        return rows[s : s + n]

    @staticmethod
    def _insert(run: np.ndarray, extra: np.ndarray, rng: np.random.Generator, replace: bool = False) -> np.ndarray:
        """``extra`` slices at random positions of ``run`` (replacing run slices when ``replace``)."""
        if replace:
            out = run.copy()
            pos = rng.choice(len(out), size=min(len(extra), len(out)), replace=False)
            out[pos] = extra[: len(pos)]
            return out
        pos = np.sort(rng.integers(0, len(run) + 1, size=len(extra)))
        return np.insert(run, pos, extra)


# ------------------------------------------------------------------------------------------------ augmentation


def augment_slices(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(M, 2, s, s): random flips (both axes: the pseudo-labelled coronacases volumes are stored upside down),
    gamma 0.7-1.4 and contrast/brightness jitter on the image channel, per slice."""
    m = x.shape[0]
    x = x.clone()
    for dim in (-1, -2):
        f = torch.rand(m, generator=gen) < 0.5
        x[f] = x[f].flip(dim)
    img = x[:, :1].clamp(0, 1)
    gamma = torch.empty(m, 1, 1, 1).uniform_(0.7, 1.4, generator=gen)
    scale = torch.empty(m, 1, 1, 1).uniform_(0.85, 1.15, generator=gen)
    shift = torch.empty(m, 1, 1, 1).uniform_(-0.08, 0.08, generator=gen)
    img = ((img**gamma) * scale + shift).clamp(0, 1)
    return torch.cat([img, x[:, 1:]], dim=1)


# ---------------------------------------------------------------------------------------------------- training


def _balanced_draws(labels: np.ndarray, n: int, gen: torch.Generator) -> np.ndarray:
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if not len(pos) or not len(neg):
        raise ValueError("pre-training needs positive and negative slices")
    k = n // 2
    p = pos[torch.randint(0, len(pos), (k,), generator=gen).numpy()]
    q = neg[torch.randint(0, len(neg), (n - k,), generator=gen).numpy()]
    out = np.concatenate([p, q])
    return out[torch.randperm(len(out), generator=gen).numpy()]


def _slice_logit(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """COVID score of single slices (M,): a ResNeXtPlus (sequence of length 1) or a plain classifier (1 logit)."""
    if hasattr(net, "head_from_features"):
        return net.head_from_features(net.slice_features(x)[:, None])[2][:, 0]
    return torch.sigmoid(net(x).reshape(-1))


def pretrain_encoder(
    net: nn.Module,
    table: SliceTable,
    idx: np.ndarray,
    epochs: int = 8,
    draws_per_epoch: int = 1024,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    log: Any = print,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> list[float]:
    """Stage 1: the network on single labelled slices (rows ``idx`` with label 0/1), class-balanced draws.

    Works for :class:`ResNeXtPlus` (slice score of a length-1 sequence) and for any 1-logit 2D classifier (the
    DenseNet121 baseline). Adam with cosine decay; returns the mean loss per epoch. ``checkpoint`` saves the net and
    optimizer every epoch and resumes from it when it exists.
    """
    idx = np.asarray(idx)
    idx = idx[table.label[idx] >= 0]
    y_all = table.label[idx]
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * (draws_per_epoch // batch_size)))
    history: list[float] = []
    start = 0
    if checkpoint is not None and Path(checkpoint).is_file():
        ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
        net.load_state_dict(ck["net"]), opt.load_state_dict(ck["opt"]), sched.load_state_dict(ck["sched"])
        history, start = list(ck["history"]), len(ck["history"])
    net.train()
    for ep in range(start, epochs):
        gen = torch.Generator().manual_seed(seed * 1000 + ep)
        draws = idx[_balanced_draws(y_all, draws_per_epoch, gen)]
        tot, t0 = 0.0, time.time()
        for i in range(0, len(draws), batch_size):
            b = draws[i : i + batch_size]
            x = augment_slices(table.x[torch.as_tensor(b)].float(), gen).to(device)
            y = torch.as_tensor(table.label[b], dtype=torch.float32).to(device)
            s = _slice_logit(net, x).clamp(1e-6, 1 - 1e-6)
            loss = F.binary_cross_entropy(s, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(b)
        history.append(tot / len(draws))
        log(f"pretrain epoch {ep + 1}/{epochs}: loss {history[-1]:.4f} ({time.time() - t0:.0f} s)")
        if checkpoint is not None:
            from monai_covid.io_utils import atomic_write_bytes
            import io

            buf = io.BytesIO()
            torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "history": history}, buf)
            atomic_write_bytes(checkpoint, buf.getvalue())
    return history


@torch.no_grad()
def encode_slices(net: nn.Module, x: torch.Tensor, chunk: int = 64, device: str | torch.device = "cpu") -> torch.Tensor:
    """(M, 2, s, s) -> (M, F) encoder features (eval mode) of a ResNeXtPlus; or (M,) slice scores of a plain
    1-logit classifier."""
    was = net.training
    net.eval()
    out = []
    for i in range(0, x.shape[0], chunk):
        xb = x[i : i + chunk].float().to(device)
        out.append((net.slice_features(xb) if hasattr(net, "slice_features") else torch.sigmoid(net(xb).reshape(-1))).cpu())
    net.train(was)
    return torch.cat(out)


def train_mil_head(
    net: nn.Module,
    feats: torch.Tensor,
    bags: BagBuilder,
    steps: int = 1500,
    lr: float = 5e-4,
    slice_weight: float = 1.0,
    seed: int = 0,
    log: Any = print,
    device: str | torch.device = "cpu",
) -> list[float]:
    """Stage 2: LSTM + slice attention + head of a :class:`ResNeXtPlus` on bags of frozen encoder features.

    ``feats`` (N, F) are the encoder features of every row of ``bags.table``; one bag a step, Adam.
    """
    from monai_covid.volume_detector import MILLoss

    params = [p for n, p in net.named_parameters() if n.split(".")[0] in ("lstm", "slice_attention", "head")]
    opt = torch.optim.Adam(params, lr=lr)
    loss_fn = MILLoss(slice_weight=slice_weight)
    rng = np.random.default_rng(seed)
    net.train()
    hist, run = [], 0.0
    for step in range(steps):
        rows, y, sl = bags.sample(rng)
        f = feats[torch.as_tensor(rows)][None]
        f = f + 0.05 * f.std() * torch.randn(f.shape, generator=torch.Generator().manual_seed(seed * 100_003 + step))
        out = net.head_from_features(f.to(device))
        loss = loss_fn(out, {"label": torch.tensor([y], device=device), "slice_labels": torch.as_tensor(sl, device=device)[None]})
        opt.zero_grad()
        loss.backward()
        opt.step()
        run += float(loss.detach())
        if (step + 1) % 250 == 0:
            hist.append(run / 250)
            log(f"MIL step {step + 1}/{steps}: loss {hist[-1]:.4f}")
            run = 0.0
    net.eval()
    return hist


@torch.no_grad()
def score_bags(
    net: nn.Module, feats: torch.Tensor, bags: BagBuilder, n_bags: int = 300, seed: int = 12345, device: str | torch.device = "cpu"
) -> dict[str, np.ndarray]:
    """Slice scores and volume probabilities of ``n_bags`` fresh bags (fixed seed): the threshold is chosen on these.

    For a ResNeXtPlus ``feats`` are encoder features; for a plain slice classifier they are slice scores (N,) and the
    volume score is the max over the bag."""
    rng = np.random.default_rng(seed)
    s_all, y_all, vp, vy = [], [], [], []
    for _ in range(n_bags):
        rows, y, sl = bags.sample(rng)
        if feats.ndim == 2:
            logits, _, s = net.eval().head_from_features(feats[torch.as_tensor(rows)][None].to(device))
            vp.append(float(torch.softmax(logits, -1)[0, 1]))
            s = s[0].cpu().numpy()
        else:
            s = feats[torch.as_tensor(rows)].numpy()
            vp.append(float(s.max()))
        known = sl >= 0
        s_all.append(s[known])
        y_all.append(sl[known])
        vy.append(y)
    return {"slice_scores": np.concatenate(s_all), "slice_labels": np.concatenate(y_all),
            "volume_scores": np.asarray(vp), "volume_labels": np.asarray(vy)}


def threshold_at_fpr(neg_scores: np.ndarray, max_fpr: float = 0.05) -> float:
    """Lowest threshold t (a slice is positive when score >= t) with at most ``max_fpr`` of ``neg_scores`` >= t."""
    s = np.sort(np.asarray(neg_scores, dtype=np.float32))[::-1]
    if not len(s):
        raise ValueError("no negative scores")
    k = int(np.floor(max_fpr * len(s) + 1e-9))  # this many negatives may be at or above t
    t = s[k] if k < len(s) else s[-1]
    # the next float32 above: scores are float32, and NumPy compares them with a Python float in float32
    return float(np.nextafter(t, np.float32(np.inf)))


# ----------------------------------------------------------------------------------------------------- metrics


def wilson_ci(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k / n."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return float(max(0.0, c - h)), float(min(1.0, c + h))


def block_bootstrap_f1(truth: np.ndarray, calls: np.ndarray, block: int = 10, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % CI of slice F1 by a moving-block bootstrap over the axial order (neighbouring slices are correlated)."""
    t, c = np.asarray(truth).astype(int), np.asarray(calls).astype(int)
    n = len(t)
    rng = np.random.default_rng(seed)
    starts = np.arange(0, max(1, n - block + 1))
    f1s = []
    for _ in range(n_boot):
        s = rng.choice(starts, size=int(np.ceil(n / block)))
        idx = (s[:, None] + np.arange(block)[None]).ravel()[:n]
        tp = int(((t[idx] == 1) & (c[idx] == 1)).sum())
        den = int((t[idx] == 1).sum() + (c[idx] == 1).sum())
        f1s.append(2 * tp / den if den else np.nan)
    lo, hi = np.nanpercentile(f1s, [2.5, 97.5])
    return float(lo), float(hi)


def read_csv_rows(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------ whole recipe


def volume_threshold_from_bags(scores: np.ndarray, labels: np.ndarray) -> float:
    """Threshold on a volume score (e.g. the max slice score) with the best balanced accuracy on training bags
    (midpoint between neighbouring scores; the lowest such threshold on ties)."""
    s, y = np.asarray(scores, float), np.asarray(labels, int)
    cand = np.unique(s)
    mids = np.concatenate([[cand[0] - 1e-6], (cand[1:] + cand[:-1]) / 2, [cand[-1] + 1e-6]])
    best, best_t = -1.0, 0.5
    for t in mids:
        p = s >= t
        bacc = 0.5 * ((p[y == 1]).mean() if (y == 1).any() else 1.0) + 0.5 * ((~p[y == 0]).mean() if (y == 0).any() else 1.0)
        if bacc > best + 1e-12:
            best, best_t = bacc, float(t)
    return best_t


def train_detector(
    net: nn.Module,
    table: SliceTable,
    train_idx: np.ndarray,
    pretrain_epochs: int = 8,
    draws_per_epoch: int = 1024,
    mil_steps: int = 1500,
    max_fpr: float = 0.05,
    seed: int = 0,
    log: Any = print,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    real_volume_share: float = 0.0,
) -> tuple[dict[str, Any], torch.Tensor]:
    """The whole recipe on the rows ``train_idx`` of ``table``: stage 1, encoder features of *every* row (for later
    evaluation), stage 2 (ResNeXtPlus only) and the slice threshold at ``max_fpr`` on training bags.

    Returns (summary, per-row features or slice scores). The summary holds ``slice_threshold``,
    ``volume_threshold`` (0.5 for the MIL output; chosen on training bags for a max-pooled slice classifier), the
    training-bag false-positive slice rate and the loss histories.
    """
    t0 = time.time()
    net.to(device)
    hist1 = pretrain_encoder(net, table, train_idx, epochs=pretrain_epochs, draws_per_epoch=draws_per_epoch, seed=seed,
                             log=log, checkpoint=checkpoint, device=device)
    t1 = time.time()
    feats = encode_slices(net, table.x, device=device)
    bags = BagBuilder(table, train_idx, real_volume_share=real_volume_share)
    is_mil = hasattr(net, "head_from_features")
    hist2 = train_mil_head(net, feats, bags, steps=mil_steps, seed=seed, log=log, device=device) if is_mil else []
    sc = score_bags(net, feats, bags, seed=seed + 777, device=device)
    neg = sc["slice_scores"][sc["slice_labels"] == 0]
    thr = threshold_at_fpr(neg, max_fpr)
    vol_thr = 0.5 if is_mil else volume_threshold_from_bags(sc["volume_scores"], sc["volume_labels"])
    summary = {
        "slice_threshold": round(thr, 6),
        "volume_threshold": round(vol_thr, 6),
        "train_bag_fp_slice_rate": float((neg >= thr).mean()),
        "train_bag_slice_sensitivity": float((sc["slice_scores"][sc["slice_labels"] == 1] >= thr).mean()),
        "train_bag_volume_accuracy": float(((sc["volume_scores"] >= vol_thr) == (sc["volume_labels"] == 1)).mean()),
        "n_train_slices": int((table.label[train_idx] >= 0).sum()),
        "n_train_groups": len(set(table.group[train_idx].tolist())),
        "pretrain_loss": hist1,
        "mil_loss": hist2,
        "seconds_pretrain": round(t1 - t0, 1),
        "seconds_total": round(time.time() - t0, 1),
    }
    log(f"thresholds: slice {thr:.4f} (training-bag FP rate {summary['train_bag_fp_slice_rate']:.3f}), volume {vol_thr:.3f}")
    return summary, feats


def fit_and_save(
    net: nn.Module,
    table: SliceTable,
    model_path: str | Path,
    summary_path: str | Path,
    train_idx: np.ndarray | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`train_detector` on ``train_idx`` (default: every row of ``table``, P001 with its volume label only),
    then the fp16 weights to ``model_path`` and the summary (thresholds, training-bag rates, losses) as JSON."""
    from monai_covid.io_utils import atomic_write_json, save_fp16

    rows = np.arange(len(table)) if train_idx is None else np.asarray(train_idx)
    summary, _ = train_detector(net, table, rows, **kwargs)
    save_fp16(net, model_path)
    atomic_write_json(summary_path, summary)
    return summary
