#!/usr/bin/env bash
# CXR v3 grouped 5-fold CV (issue 19) on a lent GPU machine (the `device` tool). Its image has PyTorch but not MONAI,
# ignite or fire, and ../shared does not travel; the 3,060 X-rays (94 MB of png) exceed what one call carries
# (64 MiB with the working tree), so they travel in two calls to one warm machine (warm for 30 s after a call).
# Prepare here, in the repository root (.whl and .devdata are git-ignored through .git/info/exclude):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl monai==1.6.1 pytorch-ignite==0.5.5 fire==0.7.1 termcolor==3.3.0
#   (cd ../shared/data && tar -cf $OLDPWD/.devdata/cxr_a.tar cxr_infection/train/covid/images &&
#    tar -cf $OLDPWD/.devdata/cxr_b.tar cxr_infection/README.md cxr_infection/train/{non_covid,normal}/images \
#        cxr_infection/train/*/infection_masks)
# The lung masks stay here: training does not read them, scoring (here, on the CPU) does.
# Call 1 (carry .whl .devdata/cxr_a.tar):  bash docs/device/cxr_cv_gpu.sh stage
# Call 2 (carry .devdata/cxr_b.tar), at once: bash docs/device/cxr_cv_gpu.sh train [SECONDS]
# Call 2 trains every (variant, fold) run of `monai_covid.cxr_cv` at once (10 one-thread jobs, CUDA, the bundle's
# mixed precision) for at most SECONDS (default 480), resuming from /tmp/cxr_gpu/work when called again, and returns
# $OUT/fold<k>.tar (both variants' last-epoch weights in fp16, train_info.json, overrides.json) and $OUT/logs.tar.
# CXR_EXTRA: more cxr_cv arguments (a local smoke test: CXR_EXTRA='--every 60 --set max_epochs=1').
# Score and report here: untar into WORK and run `python -m monai_covid.cxr_cv score/report ... --work_dir WORK`.
set -o pipefail
root=/tmp/cxr_gpu data=/tmp/cxr_gpu/data work=/tmp/cxr_gpu/work
bundle=bundles/covid_cxr_infection_map_unet
case "$1" in
stage)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 3
    mkdir -p "$data" && tar -xf .devdata/cxr_a.tar -C "$data" || exit 4
    echo "staged: $(find "$data" -name '*.png' | wc -l) png, site: $(ls /tmp/site | wc -l) entries"
    ;;
train)
    [ -d /tmp/site/monai ] || { echo "no /tmp/site: run the stage call first (the machine was given back?)"; exit 5; }
    [ -f .devdata/cxr_b.tar ] && tar -xf .devdata/cxr_b.tar -C "$data"
    n=$(find "$data/cxr_infection/train" -name '*.png' | wc -l)
    [ "$n" -eq 6120 ] || { echo "expected 6120 png (3060 X-rays + infection masks), found $n"; exit 6; }
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/env.txt
    python3 -c "import sys,torch,monai;print(sys.version.split()[0],torch.__version__,monai.__version__,torch.cuda.is_available())" \
        | tee -a $OUT/env.txt
    mkdir -p "$work"
    timeout "${2:-480}" python3 -m monai_covid.cxr_cv train $bundle --variants slim_cl unet --jobs 10 \
        --data_dir "$data" --work_dir "$work" --resume $CXR_EXTRA 2>&1 | tee -a "$work/cv.log"
    pkill -f "monai_covid.crossval _train" ; sleep 2
    python3 - "$work" "$OUT" <<'EOF'
import os, shutil, sys, tarfile, torch
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
pack = Path("/tmp/cxr_gpu/pack")
shutil.rmtree(pack, ignore_errors=True)
for k in range(5):
    names = []
    for v in ("slim_cl", "unet"):
        run = work / v / f"fold{k}"
        if not (run / "model_final.pt").is_file():
            continue
        dst = pack / v / f"fold{k}"
        dst.mkdir(parents=True)
        sd = torch.load(run / "model_final.pt", map_location="cpu", weights_only=True)
        torch.save({n: t.half() if t.is_floating_point() else t for n, t in sd.items()}, dst / "model_final.pt")
        for f in ("train_info.json", "overrides.json"):
            if (run / f).is_file():
                shutil.copy(run / f, dst / f)
        names.append(f"{v}/fold{k}")
    if names:
        with tarfile.open(out / f"fold{k}.tar", "w") as t:
            for n in names:
                t.add(pack / n, arcname=n)
with tarfile.open(out / "logs.tar", "w") as t:
    for f in sorted(work.glob("*.log")):
        t.add(f, arcname=f.name)
print("packed:", sorted(p.name for p in out.iterdir()))
EOF
    ;;
*) echo "usage: $0 stage|train [SECONDS]"; exit 2 ;;
esac
