#!/usr/bin/env bash
# Lesion-bundle CV on a lent GPU machine (the `device` tool): its image has PyTorch but not MONAI, ignite or fire, and
# ../shared does not travel. Prepare here, in the repository root (both folders are git-ignored via .git/info/exclude):
#   printf "/.whl/\n/.devdata/\n" >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl monai==1.6.1 pytorch-ignite==0.5.5 fire==0.7.1 termcolor==3.3.0
#   mkdir -p .devdata/ct_lesion_slices && cp -r ../shared/data/ct_lesion_slices/{train,README.md} .devdata/ct_lesion_slices/
# then run there (carry .whl and .devdata):  bash docs/device/lesion_cv_gpu.sh BUNDLE WORK_DIR VARIANT [VARIANT ...]
# Tables land in $OUT/cv (cv_results.md, cv_folds.csv, cv_per_image.csv). Use a fresh WORK_DIR per bundle: crossval
# stops on a finished run of the same variant name with other settings (another bundle's recipe) found there.
set -o pipefail
bundle=$1 work=$2; shift 2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/env.txt
python3 -c "import sys,torch,monai;print(sys.version.split()[0], torch.__version__, monai.__version__, torch.cuda.is_available())" | tee -a $OUT/env.txt
timeout ${CV_TIMEOUT:-520} python3 -m monai_covid.crossval "$bundle" --variants "$@" --jobs 15 --data_dir "$PWD/.devdata" \
  --work_dir "$work" --docs_dir "$OUT/cv" --resume 2>&1 | tee "$OUT/cv.log"
