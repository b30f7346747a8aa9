"""``fusedres-bench``: fusedres against eager PyTorch and torch.compile.

On a GPU: every op in every mode on ResNet-50's batch-norm shapes, timed with do_bench, providers interleaved
case by case in one process. Without a GPU: a CPU run, clearly labelled: eager timed with
torch.utils.benchmark, the fused kernels run once through Triton's interpreter on small shapes and reported by
their error against eager (interpreter times are not speed).
"""
from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import re
import sys
import time

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
PROVIDERS = ("eager", "compile", "fusedres")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fusedres-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=["ops"], default="ops", help="what to measure")
    parser.add_argument("--dtype", default="bf16", help="comma-separated: bf16, fp16, fp32")
    parser.add_argument("--layout", default="channels_last", help="comma-separated: channels_last, nchw")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 on a GPU, 2 on a CPU")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated: " + ", ".join(PROVIDERS))
    parser.add_argument("--ops", default="batch_norm_relu,batch_norm_add_relu,add_relu")
    parser.add_argument("--modes", default="inference,train_forward,backward,forward_backward")
    parser.add_argument("--quick", action="store_true", help="a few shapes, short timings")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="results folder (default: fusedres-bench-results/<device>-<date>)")
    parser.add_argument("--warmup-ms", type=float, default=25.0)
    parser.add_argument("--rep-ms", type=float, default=100.0)
    return parser.parse_args(argv)


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def main(argv=None) -> int:
    options = parse_args(argv)
    import torch

    from fusedres.kernels import INTERPRETING

    on_gpu = torch.cuda.is_available() and not INTERPRETING
    if not on_gpu and not INTERPRETING:
        # Triton reads TRITON_INTERPRET when imported, and importing this module imported it: start again.
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        args = sys.argv[1:] if argv is None else list(argv)
        os.execve(sys.executable, [sys.executable, "-m", "fusedres.benchmark.cli", *args], env)
    from . import environment, report
    from .ops_suite import run_ops

    device = torch.device("cuda" if on_gpu else "cpu")
    env = environment.collect(device)
    providers = [p for p in _split(options.providers) if p in PROVIDERS]
    unknown = set(_split(options.providers)) - set(PROVIDERS)
    if unknown:
        sys.exit(f"fusedres-bench: unknown providers {sorted(unknown)}; choose from {PROVIDERS}")
    if not on_gpu:
        providers = [p for p in providers if p != "compile"]  # inductor on a CPU says nothing about GPUs
    dtypes = [getattr(torch, DTYPES[d]) for d in _split(options.dtype)]
    layouts = _split(options.layout)
    out = options.out or pathlib.Path("fusedres-bench-results") / (
        re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-") + "-"
        + datetime.date.today().isoformat())
    started = time.time()
    copy_gbps = None
    if on_gpu:
        from .timing import copy_bandwidth_gbps

        copy_gbps = copy_bandwidth_gbps(device)
    rows = run_ops(device, dtypes=dtypes, layouts=layouts, providers=providers, ops=_split(options.ops),
                   modes=_split(options.modes), batch_size=options.batch_size or (128 if on_gpu else 2),
                   quick=options.quick, warmup_ms=options.warmup_ms, rep_ms=options.rep_ms)
    report.add_derived(rows, copy_gbps)
    title = (f"fusedres-bench ops · {env['device']}" if on_gpu else
             "fusedres-bench ops · CPU run: eager timed on the CPU; fusedres run in Triton's interpreter, "
             "checked against eager, not timed")
    summary = report.write_all(rows, env, out, copy_gbps=copy_gbps, title=title)
    print(summary)
    print(f"fusedres-bench: {len(rows)} rows in {time.time() - started:.0f} s -> {out}/results.json, "
          f"results.csv, summary.md, speedup.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
