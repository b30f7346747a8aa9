#!/usr/bin/env bash
# The prepared GPU run, one call on the GPU machine (no network; torch, triton, torchvision, timm, pytest,
# matplotlib, scikit-learn and tqdm preinstalled; run from the repository root): the test suite on the GPU, then
# the benchmark at batch 128 bf16 channels_last and batch 64 fp32 NCHW, each suite in its own process with its own
# time limit, so that one slow part cannot take the others' results with it. About 5 minutes on an H100.
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

echo "== GPU tests"
timeout 75 python -m pytest -q -m "not aot" -p no:cacheprovider tests > "$out/gpu-tests.log" 2>&1
echo "(pytest exit $?)"; tail -3 "$out/gpu-tests.log"

bench() {  # NAME LIMIT_S ARGS...: one suite, one process, its own folder
    local name=$1 limit=$2; shift 2
    echo "== $name"
    timeout "$limit" python -m fusedres.benchmark.cli "$@" --out "$out/$name" > "$out/$name.log" 2>&1
    echo "($name: exit $?)"
}
# Primary configuration: every provider on the ops and blocks; models without torch.compile (its compile of a
# ResNet-50 training step alone would take this script's budget; run `fusedres-bench --suite models` for it).
bench ops-bf16-channels_last-b128 90 --suite ops --quick --dtype bf16 --layout channels_last --batch-size 128
bench blocks-bf16-channels_last-b128 40 --suite blocks --quick --dtype bf16 --layout channels_last --batch-size 128
bench models-bf16-channels_last-b128 40 --suite models --dtype bf16 --layout channels_last --batch-size 128 \
    --providers eager,fusedres
bench ops-fp32-nchw-b64 25 --suite ops --quick --dtype fp32 --layout nchw --batch-size 64 --providers eager,fusedres
bench models-fp32-nchw-b64 25 --suite models --dtype fp32 --layout nchw --batch-size 64 --providers eager,fusedres
bench numerics-digits 15 --suite numerics --numerics-steps 100

echo "== results in $out"
python - "$out" <<'PY'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*/results.json")):
    rows = json.loads(path.read_text())["rows"]
    print(f"-- {path.parent.name}")
    for r in rows:
        if r["provider"] == "fusedres":
            fields = [r["op"], r["mode"], r["shape"], f"{r['ms']:.3f} ms" if r["ms"] else r.get("note") or "-"]
            for key, fmt in (("speedup_vs_eager", "x{:.2f} eager"), ("speedup_vs_compile", "x{:.2f} compile"),
                             ("pct_copy_bw", "{:.0f}% copy BW"), ("images_per_s", "{:.0f} img/s"),
                             ("max_abs_error", "err {:.1e}")):
                if r.get(key) is not None:
                    fields.append(fmt.format(r[key]))
            print("  " + " | ".join(fields))
PY
