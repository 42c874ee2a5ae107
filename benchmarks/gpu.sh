#!/usr/bin/env bash
# The GPU benchmark suite in one go (< 8 min on one H100/H200), no network needed.
#
#   OUT=/some/dir bash benchmarks/gpu.sh            # on the GPU machine, from the repo root
#   SMOKE=1 OUT=/tmp/gpu_smoke bash benchmarks/gpu.sh   # check the script on a CPU (1-2 min)
#
# 1. Installs what the machine lacks from wheels brought along in .whl/ (fetch them where pip
#    works with benchmarks/fetch_gpu_wheels.sh); nothing is downloaded here.
# 2. JAX train-step throughput, float32 (TF32) and bfloat16 (benchmarks/gpu_throughput.py).
# 3. PyTorch on the same nets: TF32, AMP bf16 + channels_last, + torch.compile
#    (benchmarks/gpu_torch.py).
# 4. One report with FLOP/s, MFU and JAX/PyTorch ratios: $OUT/gpu_report.{md,json}.
# Every stage has its own time budget; each writes its JSON as it goes, so a stage cut short
# still leaves the rows it finished.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_run}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/unetjax_site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/unetjax_site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
$PY - <<'PY' 2>&1 | tee "$OUT/environment.txt"
import jax, torch
print("jax", jax.__version__, jax.devices())
print("torch", torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
PY
if [ -n "${SMOKE:-}" ]; then
  JAX_ARGS="--smoke --budget-seconds 200"; TORCH_ARGS="--smoke --budget-seconds 60 --modes tf32,amp_bf16_cl"
else
  JAX_ARGS="--budget-seconds ${JAX_BUDGET:-220}"; TORCH_ARGS="--budget-seconds ${TORCH_BUDGET:-170}"
fi
timeout 300 $PY benchmarks/gpu_throughput.py --out "$OUT" $JAX_ARGS 2>&1 | tee "$OUT/jax.log"
timeout 240 $PY benchmarks/gpu_torch.py --out "$OUT" $TORCH_ARGS 2>&1 | tee "$OUT/torch.log"
$PY benchmarks/gpu_report.py "$OUT/gpu_throughput.json" --torch "$OUT/gpu_torch.json" \
  --out "$OUT/gpu_report" 2>&1 | tee "$OUT/report.log"
