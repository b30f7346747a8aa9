#!/usr/bin/env bash
# The prepared GPU run, one call on the GPU machine (no network; torch, triton, torchvision, timm, pytest,
# matplotlib, scikit-learn and tqdm preinstalled; run from the repository root): the test suite on the GPU, then
# the benchmark at batch 128 bf16 channels_last and batch 64 fp32 NCHW, each suite in its own process with its own
# time limit, so that one slow part cannot take the others' results with it; the kernels suite's prediction beside
# the measured time at batch 128, bf16 channels_last. At most 280 s of limits: room to rerun it once within a
# 15-minute GPU lease.
# Everything lands under the folder given (default bench/results/<gpu>-<date>); a short table is printed last.
#   bash bench/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -cs 'A-Za-z0-9' '-' | sed 's/-$//')
out=${1:-bench/results/${gpu:-unknown-gpu}-$(date -u +%F)}
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" \
    | tee "$out/versions.txt"

# The GPU-only checks first (the merges under real concurrency, CUDA graphs, no host sync, ResNet-sized shapes):
# the rest of the suite JIT-compiles hundreds of variants, more than this budget holds.
echo "== GPU tests"
timeout 90 python -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$out/gpu-tests.log" 2>&1
echo "(pytest exit $?)"; tail -3 "$out/gpu-tests.log"

bench() {  # NAME LIMIT_S ARGS...: one suite, one process, its own folder
    local name=$1 limit=$2; shift 2
    echo "== $name"
    timeout "$limit" python -m fusedres.benchmark.cli "$@" --out "$out/$name" > "$out/$name.log" 2>&1
    echo "($name: exit $?)"
}
# Primary configuration: every provider on the ops and blocks; models without torch.compile (its compile of a
# ResNet-50 training step alone would take this script's budget; run `fusedres-bench --suite models` for it).
bench ops-bf16-channels_last-b128 60 --suite ops --quick --dtype bf16 --layout channels_last --batch-size 128
bench blocks-bf16-channels_last-b128 25 --suite blocks --quick --dtype bf16 --layout channels_last --batch-size 128
bench models-bf16-channels_last-b128 30 --suite models --dtype bf16 --layout channels_last --batch-size 128 \
    --providers eager,fusedres
bench ops-fp32-nchw-b64 15 --suite ops --quick --dtype fp32 --layout nchw --batch-size 64 --providers eager,fusedres
bench numerics-digits 15 --suite numerics --numerics-steps 100
# The model checked against the GPU: compiled and counted on the CPU cores, then each op timed (shorter do_bench
# runs: the ratio to the prediction needs the median, not its last percent).
bench kernels-bf16-channels_last-b128 45 --suite kernels --quick --dtype bf16 --layout channels_last \
    --batch-size 128 --warmup-ms 10 --rep-ms 50

echo "== results in $out"
python - "$out" <<'PY'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*/results.json")):
    rows = json.loads(path.read_text())["rows"]
    print(f"-- {path.parent.name}")
    for r in rows:
        if r["level"] == "kernel":  # measured beside the model's prediction (spec-sheet H200, this GPU's copy BW)
            fields = [r["op"], r["mode"], r["shape"], r["dtype"], r["layout"],
                      f"measured {r['ms']:.3f} ms" if r["ms"] else "not measured"]
            for key, fmt in (("predicted_ms_measured_copy_bw", "predicted {:.3f} ms at copy BW"),
                             ("measured_over_predicted", "measured/predicted {:.2f}"),
                             ("predicted_ms_h200", "predicted {:.3f} ms at H200 spec"),
                             ("counted_element_bytes", "{:.2f} B/elem counted"),
                             ("floor_element_bytes", "floor {}"), ("note", "{}")):
                if r.get(key) is not None:
                    fields.append(fmt.format(r[key]))
            print("  " + " | ".join(fields))
        elif r["provider"] == "fusedres":
            fields = [r["op"], r["mode"], r["shape"], f"{r['ms']:.3f} ms" if r["ms"] else r.get("note") or "-"]
            for key, fmt in (("speedup_vs_eager", "x{:.2f} eager"), ("speedup_vs_compile", "x{:.2f} compile"),
                             ("pct_copy_bw", "{:.0f}% copy BW"), ("images_per_s", "{:.0f} img/s"),
                             ("max_abs_error", "err {:.1e}")):
                if r.get(key) is not None:
                    fields.append(fmt.format(r[key]))
            print("  " + " | ".join(fields))
PY
