#!/usr/bin/env bash
# The prepared GPU run, one call on the GPU machine (no network; torch, triton, torchvision, timm, pytest,
# matplotlib, tqdm preinstalled): the test suite on the GPU, then the benchmark at batch 128 bf16 channels_last and
# batch 64 fp32 NCHW. Everything lands under the folder given (default bench/results/<gpu>-<date>); a short
# table is printed last.
#   bash bench/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -cs 'A-Za-z0-9' '-' | sed 's/-$//')
out=${1:-bench/results/${gpu:-unknown-gpu}-$(date -u +%F)}
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee "$out/versions.txt"

echo "== GPU tests"
timeout 150 python -m pytest -q -m "not aot" -p no:cacheprovider tests 2>&1 | tee "$out/gpu-tests.log" | tail -15

echo "== benchmark: ops, batch 128, bf16, channels_last"
timeout 240 python -m fusedres.benchmark.cli --quick --dtype bf16 --layout channels_last --batch-size 128 \
    --out "$out/ops-bf16-channels_last-b128" > "$out/ops-bf16-channels_last-b128.log" 2>&1
echo "== benchmark: ops, batch 64, fp32, NCHW"
timeout 200 python -m fusedres.benchmark.cli --quick --dtype fp32 --layout nchw --batch-size 64 \
    --out "$out/ops-fp32-nchw-b64" > "$out/ops-fp32-nchw-b64.log" 2>&1

echo "== results in $out"
tail -4 "$out/gpu-tests.log"
for summary in "$out"/*/summary.md; do cat "$summary"; done
