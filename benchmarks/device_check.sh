#!/usr/bin/env bash
# Every accelerator check in one run, for the device machine (one H200; about 5 minutes):
#   1. the CUDA tests: pinned digests recomputed on the GPU, a GPU party against CPU parties
#      (Ferret, FedKSeed, FedKSeed-Pro; float32 and bfloat16), the on-the-fly ZO tests;
#   2. kernel throughput on 1.2e9 entries in float32 and bfloat16 against the copy bandwidth;
#   3. a round of Ferret, FedKSeed, FedAvg and FeDeRA on a Llama-3.2-1B-shaped model in
#      bfloat16 (seconds per phase, bytes, peak memory against inference, FedKSeed's step).
# Uses the machine's own python3 (torch, triton, numba, transformers, peft are there); writes
# logs and JSON under $OUT. Each part has its own time limit, so one stuck part does not cost
# the others.
#   run: bash benchmarks/device_check.sh        (from the repository root)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/benchmarks:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export NUMBA_CACHE_DIR=/tmp/numba-cache
PY=${PYTHON:-python3}
start=$(date +%s)
step() { echo; echo "=== $1 ($(( $(date +%s) - start )) s) ==="; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton, numba, transformers, peft; print('torch', torch.__version__,
'triton', triton.__version__, 'numba', numba.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, 'gpu', torch.cuda.get_device_name())"

step "CUDA tests"
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_randomness.py tests/test_devices.py \
    tests/test_fedkseed.py -k "cuda or gpu or onthefly or bfloat16 or digests or known" \
    2>&1 | tee "$OUT/tests.log" | tail -15

step "kernel throughput, 1.2e9 entries"
timeout 180 $PY benchmarks/bench_randomness.py --device cuda --entries 1200000000 \
    --json "$OUT/randomness_gpu.json" 2>&1 | tee "$OUT/randomness_gpu.log"

step "a round of every method, Llama-3.2-1B shape, bfloat16, 1 x 512 tokens, 2 clients"
timeout 420 $PY benchmarks/bench_gpu.py --config benchmarks/configs/llama-3.2-1b.json \
    --device cuda --dtype bfloat16 --tokens 512 --clients 2 --rounds 2 \
    --json "$OUT/gpu.json" 2>&1 | grep -v Warning | tee "$OUT/gpu.log" | tail -30

step "done"
