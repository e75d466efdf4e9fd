"""Tables and the slice-score figure of the grouped cross-validation written by ``scripts/crossval.py``.

    python bundles/covid_ct_volume_resnextplus/scripts/cv_report.py --cv /tmp/21/cv \
        --out bundles/covid_ct_volume_resnextplus/docs

Writes ``OUT/cv_results.json`` (every figure below with its N and 95 % CI), ``OUT/cv_slice_scores.png`` and prints
the Markdown table rows. CIs: Wilson for rates; moving-block bootstrap (10 slices) for P001 slice F1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from monai_covid.volume_detector import binary_metrics  # noqa: E402
from monai_covid.volume_mil import block_bootstrap_f1, wilson_ci  # noqa: E402

MODELS = {"resnextplus": "ResNeXt+ (slim, MIL head)", "densenet121": "MONAI DenseNet121 (slim) + max over slices"}


def _rate(k: int, n: int) -> dict:
    lo, hi = wilson_ci(k, n)
    return {"k": k, "n": n, "rate": k / n if n else float("nan"), "ci95": [lo, hi]}


def summarise(folder: Path) -> dict:
    folds = [json.loads(p.read_text()) for p in sorted(folder.glob("fold*.json"))]
    out: dict = {"n_folds": len(folds), "per_fold": []}
    real_right, real_n, pseudo_right, pseudo_n = 0, 0, 0, 0
    neg2d, neg2d_n, pos2d, pos2d_n = 0, 0, 0, 0
    by_source: dict[str, list[int]] = {}
    p001_f1 = []
    for f in folds:
        row = {
            "fold": f["fold"],
            "slice_threshold": f["summary"]["slice_threshold"],
            "train_bag_fp_slice_rate": f["summary"]["train_bag_fp_slice_rate"],
            "seconds": f["summary"].get("seconds_with_encoding"),
        }
        for g, v in f["volumes"].items():
            right = int(v["called_covid"] == v["volume_label"])
            if g in ("P001", "normal001"):
                real_right += right
                real_n += 1
                calls = (np.asarray(v["slice_scores"]) >= f["summary"]["slice_threshold"]).astype(int)
                truth = np.asarray(v["truth"])
                entry = {
                    "volume_score": v["volume_score"],
                    "called_covid": v["called_covid"],
                    "positive_slices": _rate(int(calls.sum()), len(calls)),
                }
                if g == "P001":
                    m = binary_metrics(truth, calls)
                    entry["slice_f1"] = m["F1"]
                    entry["slice_f1_ci95"] = list(block_bootstrap_f1(truth, calls))
                    entry["slice_sen"], entry["slice_spe"] = m["SEN"], m["SPE"]
                    p001_f1.append(m["F1"])
                    s = np.asarray(v["slice_scores"])
                    pos, neg = s[truth == 1], s[truth == 0]  # Mann-Whitney AUC: ranking, whatever the threshold
                    entry["slice_auc"] = float(
                        ((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())
                    )
                row[g] = entry
            else:
                pseudo_right += right
                pseudo_n += 1
        s2 = f["slices_2d"]
        neg2d += s2["non_covid"]["positive"]
        neg2d_n += s2["non_covid"]["n"]
        pos2d += s2["covid"]["positive"]
        pos2d_n += s2["covid"]["n"]
        for src, (k, n) in s2["non_covid"]["by_source"].items():
            by_source.setdefault(src, [0, 0])
            by_source[src][0] += k
            by_source[src][1] += n
        out["per_fold"].append(row)
    out["real_volume_accuracy"] = _rate(real_right, real_n)
    out["pseudo_volume_accuracy"] = _rate(pseudo_right, pseudo_n)
    out["non_covid_2d_positive"] = _rate(neg2d, neg2d_n)
    out["non_covid_2d_positive_by_source"] = {k: _rate(*v) for k, v in by_source.items()}
    out["covid_2d_sensitivity"] = _rate(pos2d, pos2d_n)
    out["p001_slice_f1_mean"] = float(np.mean(p001_f1)) if p001_f1 else float("nan")
    n001 = [r["normal001"]["positive_slices"] for r in out["per_fold"] if "normal001" in r]
    out["normal001_positive"] = _rate(sum(r["k"] for r in n001), sum(r["n"] for r in n001))
    return out


def plot(cv: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("P001", k) for k in range(4)] + [("normal001", k) for k in (0, 2)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.55 * len(panels)), dpi=90, sharex=False)
    colors = {"resnextplus": "tab:blue", "densenet121": "tab:orange"}
    for ax, (g, k) in zip(axes, panels):
        for model, c in colors.items():
            p = cv / model / f"fold{k}.json"
            if not p.is_file():
                continue
            f = json.loads(p.read_text())
            v = f["volumes"].get(g)
            if v is None:
                continue
            s = np.asarray(v["slice_scores"])
            ax.plot(s, color=c, lw=1, label=f"{MODELS[model].split(' (')[0]} (P={v['volume_score']:.2f})")
            ax.axhline(f["summary"]["slice_threshold"], color=c, ls="--", lw=0.7)
            if g == "P001" and model == "resnextplus":
                t = np.asarray(v["truth"])
                ax.fill_between(
                    np.arange(len(t)), 0, t * 1.0, color="red", alpha=0.12, step="mid", label="radiologist: infected"
                )
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("score", fontsize=7)
        ax.set_title(
            f"{g}, held out in fold {k}" + (" (normal001 a training volume)" if g == "P001" and k in (1, 3) else ""),
            fontsize=8,
        )
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6, loc="upper right")
    axes[-1].set_xlabel("slice index (InstanceNumber - 1, superior first)", fontsize=7)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cv", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cv, out = Path(args.cv), Path(args.out)
    res = {m: summarise(cv / m) for m in MODELS if (cv / m).is_dir() and list((cv / m).glob("fold*.json"))}
    final = cv / "resnextplus" / "final.json"
    if final.is_file():
        res["final"] = json.loads(final.read_text())["summary"]
    (out / "cv_results.json").write_text(json.dumps(res, indent=1) + "\n")
    plot(cv, out / "cv_slice_scores.png")

    def pct(r: dict) -> str:
        return f"{100 * r['rate']:.1f} % ({r['k']}/{r['n']}; {100 * r['ci95'][0]:.1f}-{100 * r['ci95'][1]:.1f})"

    for m, r in res.items():
        if m == "final":
            continue
        f1s = "; ".join(
            f"f{row['fold']}: {row['P001']['slice_f1']:.3f} "
            f"({row['P001']['slice_f1_ci95'][0]:.2f}-{row['P001']['slice_f1_ci95'][1]:.2f})"
            for row in r["per_fold"]
            if "P001" in row
        )
        calls = ", ".join(
            f"f{row['fold']} P001 {row['P001']['volume_score']:.2f}"
            + (f" / normal001 {row['normal001']['volume_score']:.2f}" if "normal001" in row else "")
            for row in r["per_fold"]
        )
        print(
            f"| {MODELS[m]} | {pct(r['real_volume_accuracy'])} | {pct(r['pseudo_volume_accuracy'])} | {f1s} | "
            f"{pct(r['normal001_positive'])} | {pct(r['non_covid_2d_positive'])} | "
            f"{pct(r['covid_2d_sensitivity'])} | {calls} |"
        )


if __name__ == "__main__":
    main()
