#!/usr/bin/env bash
# Wheels of the packages clipsam needs that the lent GPU machines' image lacks (its Python is
# 3.12 and has torch, lightning, torchmetrics, timm, opencv, scipy, scikit-learn; see
# /work/.library/device/KINDS.md), downloaded into .whl/ for `scripts/device_check.sh`.
# Run here, in the repository root, where PyPI is reachable; about 10 MB.
# wandb, jsonargparse and omegaconf are left out (the CLI test of tests/gpu is skipped there).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 segment-anything==1.0 \
  albumentations==2.0.8 albucore==0.0.24 stringzilla==5.3.2 simsimd==6.5.16 \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
ls -1 .whl
