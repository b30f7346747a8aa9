"""``fusedres-bench``: fusedres against eager PyTorch and torch.compile, from single ops to whole ResNets.

On a GPU: the ops on ResNet-50's batch-norm shapes, the seed's and torchvision's blocks, torchvision's ResNet-18/50
(inference and a training step) timed with do_bench, providers interleaved case by case in one process; and a
numerics check, SmallResNet trained eagerly and fused on scikit-learn's digits; the kernels suite, what each op
launches, moves and compiles to as fusedres.report.kernel_report predicts it, beside its measured time. Without a GPU: a
CPU run, labelled as such: eager timed with torch.utils.benchmark, the fused kernels run through Triton's
interpreter on small shapes and reported by their error against eager PyTorch on float64 copies (interpreter times
are not speed), and the kernels suite's prediction alone.
"""
from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import re
import signal
import sys
import time
from typing import Iterable

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
PROVIDERS = ("eager", "compile", "fusedres", "save_memory")  # save_memory: the models suite's "fusedres (save_memory)"
SUITES = ("ops", "blocks", "models", "numerics", "kernels")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fusedres-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default=",".join(SUITES), help="comma-separated: " + ", ".join(SUITES))
    parser.add_argument("--dtype", default="bf16", help="comma-separated: bf16, fp16, fp32 (blocks and models run "
                                                         "half types under autocast)")
    parser.add_argument("--layout", default="channels_last", help="comma-separated: channels_last, nchw")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 on a GPU, 2 on a CPU (the "
                                                                      "kernels suite: 128 everywhere)")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated: " + ", ".join(PROVIDERS))
    parser.add_argument("--ops", default="batch_norm_relu,batch_norm_add_relu,add_relu",
                        help="comma-separated: batch_norm_relu, batch_norm_add_relu, add_relu, and the frozen "
                             "batch-norm's frozen_batch_norm_relu, frozen_batch_norm_add_relu")
    parser.add_argument("--sites", default="resnet50", help="the ops suite's shapes: resnet50 (ResNet-50's batch-norm "
                                                            "sites) or r3d_18 (a video ResNet's, 3-D)")
    parser.add_argument("--modes", default="inference,train_forward,backward,forward_backward",
                        help="modes of the ops suite")
    parser.add_argument("--activation", default="relu", help="the ops suite's activation in ReLU's place: one of "
                                                             "fusedres.functional.ACTIVATIONS")
    parser.add_argument("--numerics-steps", type=int, default=None, help="default: 100 on a GPU, 4 on a CPU")
    parser.add_argument("--numerics-batch-size", type=int, default=None, help="default: 64 on a GPU, 8 on a CPU")
    parser.add_argument("--quick", action="store_true", help="a few shapes and blocks, short timings")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="results folder (default: fusedres-bench-results/<device>-<date>)")
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up, in milliseconds")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="do_bench repetition time, in milliseconds")
    return parser.parse_args(argv)


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _choose(option: str, given: str, allowed) -> list[str]:
    chosen = _split(given)
    unknown = sorted(set(chosen) - set(allowed))
    if unknown or not chosen:
        sys.exit(f"fusedres-bench: --{option} {given!r}: unknown {unknown}; choose from {', '.join(allowed)}")
    return chosen


def _run_suite(suite: str, settings, options, out: pathlib.Path) -> Iterable[dict]:
    """The suite's rows, each as soon as it is measured."""
    if suite == "ops":
        from .ops_suite import run_ops

        from .cases import FROZEN_OPS, OPS

        return run_ops(settings, ops=_choose("ops", options.ops, OPS + FROZEN_OPS),
                       modes=_choose("modes", options.modes, ("inference", "train_forward", "backward",
                                                              "forward_backward")))
    if suite == "blocks":
        from .blocks_suite import run_blocks

        return run_blocks(settings)
    if suite == "models":
        from .blocks_suite import run_models

        return run_models(settings)
    if suite == "kernels":
        from fusedres.report.kernel_report import BATCH

        from .kernels_suite import run_kernels

        return run_kernels(settings, batch=options.batch_size or BATCH)  # a prediction: the real size on a CPU too
    from dataclasses import replace

    from .numerics import run_numerics

    numerics = replace(settings, batch_size=options.numerics_batch_size or (64 if settings.on_gpu else 8))
    return run_numerics(numerics, options.numerics_steps or (100 if settings.on_gpu else 4), out)


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
    from fusedres.activations import ACTIVATIONS  # (Triton is imported by now, as this process needs it)

    from . import environment, report
    from .runner import Settings

    suites = _choose("suite", options.suite, SUITES)
    from .runner import SAVE_MEMORY

    providers = [SAVE_MEMORY if p == "save_memory" else p for p in _choose("providers", options.providers, PROVIDERS)]
    if not on_gpu:
        providers = [p for p in providers if p != "compile"]  # inductor on a CPU says nothing about GPUs
    device = torch.device("cuda" if on_gpu else "cpu")
    settings = Settings(device=device, dtypes=[getattr(torch, DTYPES[d]) for d in _choose("dtype", options.dtype,
                                                                                         DTYPES)],
                        layouts=_choose("layout", options.layout, ("channels_last", "nchw")), providers=providers,
                        batch_size=options.batch_size or (128 if on_gpu else 2), quick=options.quick,
                        warmup_ms=options.warmup_ms, rep_ms=options.rep_ms,
                        activation=_choose("activation", options.activation, ACTIVATIONS)[0],  # (the table's)
                        sites=_choose("sites", options.sites, ("resnet50", "r3d_18"))[0])
    env = environment.collect(device)
    out = options.out or pathlib.Path("fusedres-bench-results") / (
        re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-") + "-" + datetime.date.today().isoformat())
    started = time.time()
    copy_gbps = None
    if on_gpu:
        from .timing import copy_bandwidth_gbps

        copy_gbps = copy_bandwidth_gbps(device)
    cpu_run = ((["eager timed on the CPU; fusedres run in Triton's interpreter, checked against eager, not timed"]
                if set(suites) - {"kernels"} else [])
               + (["kernels predicted by the model"] if "kernels" in suites else []))
    where = env["device"] if on_gpu else "CPU run: " + "; ".join(cpu_run)
    # Every row is appended to rows.jsonl as it is measured, and the results are written however the run ends
    # (Ctrl-C, or the SIGINT/SIGTERM of a time limit, included): a run cut short keeps what it measured.
    rows, interrupted = [], None
    previous_handler = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with report.RowLog(out / "rows.jsonl") as log:
            for suite in suites:
                try:
                    for row in _run_suite(suite, settings, options, out):
                        rows.append(row)
                        log.append(row)
                except ImportError as missing:  # e.g. torchvision or scikit-learn missing: skip that level only
                    print(f"fusedres-bench: skipping the {suite} suite: {missing}", file=sys.stderr)
                except Exception as error:  # a suite's own failure (its cases' are rows): the next suite runs
                    failure = f"the {suite} suite failed: {type(error).__name__}: {str(error)[:300]}"
                    print(f"fusedres-bench: {failure}", file=sys.stderr)
                    row = dict(level=suite, op="(suite)", mode="", shape="", dtype="", layout="", provider="(suite)",
                               note=failure)
                    rows.append(row)
                    log.append(row)
    except KeyboardInterrupt as stop:
        interrupted = f"interrupted ({str(stop) or 'SIGINT'}) after {len(rows)} rows"
        print(f"\nfusedres-bench: {interrupted}; writing what was measured", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        report.add_derived(rows, copy_gbps)
        title = f"fusedres-bench · {where}" + (f" · {interrupted}" if interrupted else "")
        summary = report.write_all(rows, env, out, copy_gbps=copy_gbps, title=title)
        print(summary)
        print(f"fusedres-bench: {len(rows)} rows in {time.time() - started:.0f} s -> {out}/ rows.jsonl, "
              f"results.json, results.csv, summary.md, speedup.png" + (", numerics.png" if "numerics" in suites
                                                                       else ""))
    return 130 if interrupted else 0


def _interrupt(signum, frame):
    """SIGTERM as SIGINT: unwind, so that the results are written (``timeout`` sends TERM by default)."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    sys.exit(main())
