#!/usr/bin/env bash
# Issue 11's GPU checks in one command on a lent GPU machine (docs/benchmarks.md, "GPU").
#
#   here:   bash scripts/device_wheels.sh            # once: .whl/ with what the image lacks
#   there:  bash scripts/device_check.sh              # device tool: carry [".whl"], timeout 540
#
# Writes into $OUT (default runs/device): gpu.txt, gpu_tests.log, pipeline_paper_cuda.json
# (+ .log), pipeline_paper_cuda_compiled.json (+ .log), precision_cuda.json. Each step has its
# own time limit, so one that hangs does not cost the others; the exit status is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
status=0
step() {  # step <seconds> <log> <command...>
  local limit=$1 log=$2; shift 2
  echo "== $* (limit ${limit}s)"
  timeout "$limit" "$@" > "$log" 2>&1; local rc=$?
  tail -n 25 "$log"
  [ $rc -eq 0 ] || { echo "== exit $rc"; status=1; }
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"
step 150 "$OUT/gpu_tests.log" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu
step 200 "$OUT/pipeline_paper_cuda.log" "$PY" scripts/benchmark_pipeline.py --device cuda --preset paper \
  --batch-sizes 1 16 --batches 3 --num-workers 12 --out "$OUT/pipeline_paper_cuda.json"
step 200 "$OUT/pipeline_paper_cuda_compiled.log" "$PY" scripts/benchmark_pipeline.py --device cuda --preset paper \
  --batch-sizes 16 --batches 3 --num-workers 12 --sam-compile --out "$OUT/pipeline_paper_cuda_compiled.json"
step 120 "$OUT/precision_cuda.log" "$PY" scripts/benchmark_precision.py --device cuda --images 3 \
  --modes fp32 bf16 autocast_fp16 --out "$OUT/precision_cuda.json"
exit $status
