"""Grouped leave-volume-out evaluation of the ResNeXt+ recipe and of the stock DenseNet121 max-pooling baseline.

Bundle glue only: the data, folds, bags, training stages and metrics live in ``monai_covid.volume_mil``.

Folds: every group (pseudo-labelled COVID-19 volume, UCSD patient, near-duplicate group of the 2D sets) is in one of
``--folds`` folds; P001 is never a training volume here (held out of every fold); normal001 is held out in folds
0 and 2 and a training volume in folds 1 and 3 (so both its honest reading and its effect on P001 are measured).

    python bundles/covid_ct_volume_resnextplus/scripts/crossval.py --cache /tmp/21/cache128 --out /tmp/21/cv \
        --model resnextplus          # then --model densenet121; --final trains the shipped model on every group

Writes ``OUT/<model>/fold<k>.json`` (resumable: finished folds are skipped) and ``OUT/<model>/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from monai_covid import volume_mil as vm  # noqa: E402
from monai_covid.volume_detector import binary_metrics  # noqa: E402

NORMAL_HELD_OUT = (0, 2)


def make_network(model: str) -> torch.nn.Module:
    if model == "resnextplus":
        from monai_covid.networks.resnext_plus import ResNeXtPlus

        return ResNeXtPlus()
    from monai.networks.nets import DenseNet121

    return DenseNet121(spatial_dims=2, in_channels=2, out_channels=1, init_features=16, growth_rate=16)


def fold_split(
    table: vm.SliceTable, n_folds: int, fold: int | None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, dict]:
    folds = vm.assign_folds(
        table.group, table.label, n_folds=n_folds, fixed={"P001": None, "normal001": None}, seed=seed
    )
    if fold is None:  # final: everything (P001 with its volume label only)
        return np.arange(len(table)), np.array([], dtype=int), folds
    val_groups = {g for g, f in folds.items() if f == fold} | {"P001"}
    if fold in NORMAL_HELD_OUT:
        val_groups.add("normal001")
    train_groups = set(table.group.tolist()) - val_groups
    vm.check_disjoint(train_groups, val_groups)
    return table.indices(train_groups), table.indices(val_groups), folds


def sequence_scores(net, feats: torch.Tensor, rows: np.ndarray, mil: bool) -> tuple[float, np.ndarray]:
    """(volume score, slice scores) of rows scored as one ordered sequence."""
    if mil:
        with torch.no_grad():
            logits, _, s = net.eval().head_from_features(feats[torch.as_tensor(rows)][None])
        return float(torch.softmax(logits, -1)[0, 1]), s[0].numpy()
    s = feats[torch.as_tensor(rows)].numpy()
    return float(s.max()), s


def evaluate(
    net, table: vm.SliceTable, feats: torch.Tensor, val_idx: np.ndarray, summ: dict, mil: bool, seed: int
) -> dict:
    thr, vthr = summ["slice_threshold"], summ["volume_threshold"]
    res: dict = {"volumes": {}, "slices_2d": {}}
    val_groups = set(table.group[val_idx].tolist())
    for g in sorted(val_groups):
        rows = val_idx[(table.group[val_idx] == g) & (table.order[val_idx] >= 0)]
        if not len(rows):
            continue
        rows = rows[np.argsort(table.order[rows], kind="stable")]
        p, s = sequence_scores(net, feats, rows, mil)
        truth = table.eval_label[rows]
        calls = (s >= thr).astype(int)
        res["volumes"][g] = {
            "volume_label": table.volume_label[g],
            "volume_score": p,
            "called_covid": int(p >= vthr),
            "n_slices": int(len(rows)),
            "positive_slices": int(calls.sum()),
            "slice": binary_metrics(truth, calls),
            "slice_scores": [round(float(v), 4) for v in s],
            "truth": truth.tolist(),
        }
    # loose 2D slices of the held-out groups, scored in chunks of 24 of the same class (shuffled, fixed seed)
    rng = np.random.default_rng(seed)
    loose = val_idx[table.order[val_idx] < 0]
    for lab, name in ((0, "non_covid"), (1, "covid")):
        rows = loose[table.label[loose] == lab]
        rows = rows[rng.permutation(len(rows))]
        scores = (
            np.concatenate([sequence_scores(net, feats, rows[i : i + 24], mil)[1] for i in range(0, len(rows), 24)])
            if len(rows)
            else np.array([])
        )
        res["slices_2d"][name] = {
            "n": int(len(rows)),
            "positive": int((scores >= thr).sum()),
            "by_source": {
                src: [int((scores[table.source[rows] == src] >= thr).sum()), int((table.source[rows] == src).sum())]
                for src in sorted(set(table.source[rows].tolist()))
            },
        }
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", required=True, help="folder written by SliceTable.save (build_slice_table)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="resnextplus", choices=["resnextplus", "densenet121"])
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--only", type=int, nargs="*", default=None, help="run only these folds")
    ap.add_argument("--final", action="store_true", help="train on every group (shipped model) instead of the folds")
    ap.add_argument("--pretrain_epochs", type=int, default=8)
    ap.add_argument("--draws", type=int, default=1024, help="slices drawn per pre-training epoch")
    ap.add_argument("--mil_steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--real_volume_share", type=float, default=0.0, help="share of positive-volume bags from real HU series"
    )
    ap.add_argument(
        "--equalize", action="store_true", help="histogram-equalise every slice (SliceTable.equalized) before training"
    )
    ap.add_argument("--name", default=None, help="result name for --final (default: final)")
    ap.add_argument("--save", default=None, help="fp16 weights path for --final")
    args = ap.parse_args()
    torch.set_num_threads(1)
    table = vm.SliceTable.load(args.cache)
    if args.equalize:
        table = table.equalized()
    out = Path(args.out) / args.model
    out.mkdir(parents=True, exist_ok=True)
    mil = args.model == "resnextplus"
    log_file = open(out / "log.txt", "a")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    runs = [None] if args.final else (args.only if args.only is not None else list(range(args.folds)))
    for fold in runs:
        name = (args.name or "final") if fold is None else f"fold{fold}"
        if (out / f"{name}.json").is_file():
            log(f"{name}: done already")
            continue
        torch.manual_seed(args.seed)
        tr, va, folds = fold_split(table, args.folds, fold, args.seed)
        log(f"{name}: {len(tr)} training rows ({len(set(table.group[tr]))} groups), {len(va)} held-out rows")
        net = make_network(args.model)
        t0 = time.time()
        summ, feats = vm.train_detector(
            net,
            table,
            tr,
            pretrain_epochs=args.pretrain_epochs,
            draws_per_epoch=args.draws,
            mil_steps=args.mil_steps,
            seed=args.seed,
            log=log,
            checkpoint=out / f"{name}_ckpt.pt",
            real_volume_share=args.real_volume_share,
        )
        summ["seconds_with_encoding"] = round(time.time() - t0, 1)
        res = {"fold": fold, "summary": summ, "val_groups": sorted(set(table.group[va].tolist()))}
        if fold is not None:
            res.update(evaluate(net, table, feats, va, summ, mil, args.seed))
            for g, v in res["volumes"].items():
                log(
                    f"{name} {g}: score {v['volume_score']:.3f} -> {v['called_covid']}, "
                    f"{v['positive_slices']}/{v['n_slices']} "
                    f"positive slices, slice F1 {v['slice']['F1']:.3f}"
                )
            log(f"{name} 2D: {res['slices_2d']}")
        else:
            res["all_scores"] = {}
            for g in ("P001", "normal001"):
                rows = table.indices([g])
                rows = rows[np.argsort(table.order[rows])]
                p, s = sequence_scores(net, feats, rows, mil)
                res["all_scores"][g] = {"volume_score": p, "slice_scores": [round(float(v), 4) for v in s]}
            if args.save:
                from monai_covid.volume_detector import save_state_dict_fp16

                save_state_dict_fp16(net, args.save)
                log(f"saved {args.save}")
        (out / f"{name}.json").write_text(json.dumps(res, indent=1))
        if (out / f"{name}_ckpt.pt").is_file():
            os.remove(out / f"{name}_ckpt.pt")
    log("finished")


if __name__ == "__main__":
    main()
