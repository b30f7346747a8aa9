"""The kernels suite: what each fused op launches, moves and compiles to on ResNet-50's batch-norm shapes, as
``fusedres.report.kernel_report`` predicts it without a GPU (kernels compiled for sm_90 and read from the cubin; bytes
counted in Triton's interpreter), with a roofline time at the spec-sheet bandwidth of an H100 and an H200. Every row
is a prediction from the model and says so (``source``); on a GPU the op is also timed, and the measured time
stands beside the predicted ones.

The compile half needs a process without TRITON_INTERPRET, the counting half one with it. The compile half always
runs in a child process, ``python -m fusedres.benchmark.kernels_suite compile``: its workers are forked
(``compiled.analyse_all``), and forking the benchmark's own process, its threads running and on a GPU its CUDA
context live, can deadlock them. The counting half runs here in a CPU run (the interpreter's process), in a child
(``... count``) on a GPU; its workers are spawned, not forked, for the same reason.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pathlib
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator

import torch

import fusedres
from fusedres.report import kernel_report
from fusedres.kernels import INTERPRETING

from .cases import QUICK_SITES, RESNET50_SITES, TIMED_MODE, fused_op, make_inputs, mode_callable
from .environment import usable_cores
from .runner import Settings, dtype_name, measure_gpu, progress

# The counting proxy: the interpreter runs about a millisecond per program, so bytes are counted on a tensor of
# the same dtype, layout and H x W with at most this many channels, its batch chosen to give about this many
# elements (at least 2 samples), which keeps the per-channel traffic about as small a share as at full size.
PROXY_CHANNELS = 16
PROXY_ELEMENTS = 2**16
# Spec-sheet bandwidths (kernel_report.PEAK_BANDWIDTH_GBPS) behind each predicted time.
PREDICTED_MS_FIELDS = {"predicted_ms_h100": "H100 SXM", "predicted_ms_h200": "H200"}
# What the compile half reports per case (kernel_report.analyse_cases's row).
COMPILED_FIELDS = ("launches", "kernels", "num_warps", "registers", "occupancy", "local_bytes", "load_bits",
                   "store_bits")
# A child process's time limit: startup, then each case's compile or count (a few seconds at most).
CHILD_START_S = 120
CHILD_S_PER_CASE = 10


def kernel_cases(dtypes: list[torch.dtype], layouts: list[str], batch: int, quick: bool) -> list[dict]:
    """Every op and mode of the model at the ResNet-50 sites it serves (batch-norm + ReLU: the sites followed by a
    ReLU; the others: those followed by the add), for each dtype and layout, at ``batch``."""
    sites = QUICK_SITES if quick else RESNET50_SITES
    return [dict(op=op, mode=mode, shape=(batch, channels, size, size), dtype=dtype,
                 channels_last=layout == "channels_last")
            for dtype in dtypes for layout in layouts for op, mode in kernel_report.OP_MODES
            for channels, size, follows, _ in sites
            if follows == ("relu" if op == "batch_norm_relu" else "add_relu")]


def proxy_shape(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The small tensor whose bytes are counted in the interpreter for a case of ``shape``."""
    batch, channels, height, width = shape
    channels = min(channels, PROXY_CHANNELS)
    return min(batch, max(2, PROXY_ELEMENTS // (channels * height * width))), channels, height, width


def compiled_fields(cases: list[dict], jobs: int) -> list[dict]:
    """Per case, what the sm_90 compiler makes of its launches and the kernel report's limits it breaks (a process
    without TRITON_INTERPRET)."""
    rows = kernel_report.analyse_cases(cases, jobs=jobs)
    return [dict({field: row[field] for field in COMPILED_FIELDS}, limits=kernel_report.kernel_limits(row))
            for row in rows]


def _count_one(case: dict) -> dict:
    proxy = proxy_shape(case["shape"])
    fields = dict(counted_on="x".join(map(str, proxy)))
    try:
        counts = kernel_report.count_bytes(case["op"], case["mode"], proxy, case["dtype"], case["channels_last"])
        fields["counted_element_bytes"] = kernel_report.element_bytes(counts, proxy, case["dtype"])
    except Exception as error:  # one case's failure is that row's note, not the suite's end
        fields["note"] = f"bytes not counted: {type(error).__name__}: {str(error)[:200]}"
    return fields


def counted_fields(cases: list[dict], jobs: int, bar=None) -> list[dict]:
    """Per case, the bytes per element its launches move, counted on its proxy in Triton's interpreter (a process
    with TRITON_INTERPRET=1), ``jobs`` cases at a time."""
    workers = min(jobs, len(cases))
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
    try:
        results = []
        for fields in (pool.map(_count_one, cases) if pool else map(_count_one, cases)):
            results.append(fields)
            if bar is not None:
                bar.update(1)
        return results
    finally:
        if pool:
            pool.shutdown()


HALVES = {"compile": compiled_fields, "count": counted_fields}
INTERPRETED_HALVES = {"count"}  # the compile half needs Triton's compiler, so a process without the interpreter


def _case_to_json(case: dict) -> dict:
    return dict(case, shape=list(case["shape"]), dtype=dtype_name(case["dtype"]))


def _case_from_json(case: dict) -> dict:
    return dict(case, shape=tuple(case["shape"]), dtype=getattr(torch, case["dtype"]))


def _in_child(half: str, cases: list[dict], jobs: int) -> list[dict]:
    """Run one half in a child process with or without TRITON_INTERPRET, as that half needs."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    if half in INTERPRETED_HALVES:
        env["TRITON_INTERPRET"] = "1"
    package_root = str(pathlib.Path(fusedres.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="fusedres-kernels-") as folder:
        cases_path, fields_path = pathlib.Path(folder) / "cases.json", pathlib.Path(folder) / "fields.json"
        cases_path.write_text(json.dumps([_case_to_json(case) for case in cases]))
        done = subprocess.run([sys.executable, "-m", "fusedres.benchmark.kernels_suite", half, str(cases_path),
                               str(fields_path), "--jobs", str(jobs)], env=env, capture_output=True, text=True,
                              timeout=CHILD_START_S + CHILD_S_PER_CASE * len(cases))
        if done.returncode != 0:
            last_line = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"the child process exited {done.returncode}: {last_line}")
        return json.loads(fields_path.read_text())


def _guarded(half: str, cases: list[dict], fields: Callable[[], list[dict]]) -> list[dict]:
    """``fields()``, one half's fields per case; its failure becomes every row's note (e.g. no cuobjdump), not the
    run's end."""
    try:
        return fields()
    except Exception as error:
        message = str(error) if len(str(error)) <= 400 else f"{str(error)[:150]} ... {str(error)[-250:]}"
        failure = f"kernels suite: the {half} half failed: {type(error).__name__}: {message}"
        print(f"fusedres-bench: {failure}", file=sys.stderr)
        return [dict(note=failure)] * len(cases)


def run_kernels(settings: Settings, batch: int) -> Iterator[dict]:
    """One row per op, mode, site, dtype and layout at ``batch`` (meta tensors: the prediction costs nothing at
    full size), every field a prediction; on a GPU, fusedres timed as well (``ms``), each row given as soon as it
    is measured."""
    cases = kernel_cases(settings.dtypes, settings.layouts, batch, settings.quick)
    jobs = usable_cores()
    compiled = _guarded("compile", cases, lambda: _in_child("compile", cases, jobs))
    if INTERPRETING:
        bar = progress(len(cases), "kernels (bytes counted in the interpreter)")
        counted = _guarded("count", cases, lambda: counted_fields(cases, jobs, bar))
        bar.close()
    else:
        counted = _guarded("count", cases, lambda: _in_child("count", cases, jobs))
    rows = [_row(case, compiled_here, counted_here) for case, compiled_here, counted_here
            in zip(cases, compiled, counted)]
    if not (settings.on_gpu and "fusedres" in settings.providers):
        yield from rows
        return
    bar = progress(len(cases), "kernels (timed)")
    try:
        for case, row in zip(cases, rows):
            _measure(row, case, settings)
            yield row
            bar.update(1)
    finally:
        bar.close()


def _row(case: dict, compiled: dict, counted: dict) -> dict:
    op, mode, shape, dtype = case["op"], case["mode"], case["shape"], case["dtype"]
    element_size = torch.empty((), dtype=dtype).element_size()
    numel = torch.Size(shape).numel()
    floor = kernel_report.FLOOR_ELEMENT_BYTES[(op, mode)]
    row = dict(level="kernel", op=op, mode=mode, shape="x".join(map(str, shape)), dtype=dtype_name(dtype),
               layout="channels_last" if case["channels_last"] else "nchw", provider="fusedres", source="prediction",
               floor_bytes=floor * numel * element_size, floor_element_bytes=floor,
               eager_element_bytes=kernel_report.EAGER_ELEMENT_BYTES[(op, mode)], counted_on=counted.get("counted_on"))
    row.update({field: compiled[field] for field in COMPILED_FIELDS if field in compiled})
    if counted.get("counted_element_bytes") is not None:
        row["counted_element_bytes"] = counted["counted_element_bytes"]
        row["predicted_bytes"] = counted["counted_element_bytes"] * numel * element_size
        for field, gpu in PREDICTED_MS_FIELDS.items():
            row[field] = row["predicted_bytes"] / (kernel_report.PEAK_BANDWIDTH_GBPS[gpu] * 1e9) * 1e3
    notes = [f"over a kernel-report limit: {problem}" for problem in compiled.get("limits", [])]
    notes += [fields["note"] for fields in (compiled, counted) if fields.get("note")]
    if notes:
        row["note"] = "; ".join(notes)
    return row


def _measure(row: dict, case: dict, settings: Settings) -> None:
    """fusedres in the row's op and mode, timed with do_bench: the measurement beside the prediction."""
    timed_mode = TIMED_MODE[case["mode"]]
    fn = fused_op(case["op"], training=case["mode"] in ("train_forward", "train_backward"))
    shape, dtype, channels_last = case["shape"], case["dtype"], case["channels_last"]

    def make(seed: int):
        inputs = make_inputs(shape, dtype, channels_last, settings.device, timed_mode == "backward", seed)
        return mode_callable(fn, timed_mode, inputs)

    note = row.pop("note", None)  # measure_gpu writes a failure into note: keep the prediction's as well
    measure_gpu(row, make, settings, compiled=False,
                input_bytes=torch.empty((), dtype=dtype).element_size() * torch.Size(shape).numel())
    notes = [text for text in (note, row.get("note")) if text]
    if notes:
        row["note"] = "; ".join(notes)


def main(argv=None) -> int:
    """``python -m fusedres.benchmark.kernels_suite {compile,count} CASES_JSON FIELDS_JSON``: one half of the
    suite's prediction for the cases given, written as JSON (the suite's child process)."""
    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("half", choices=sorted(HALVES))
    parser.add_argument("cases", type=pathlib.Path)
    parser.add_argument("fields", type=pathlib.Path)
    parser.add_argument("--jobs", type=int, default=1)
    options = parser.parse_args(argv)
    interprets = options.half in INTERPRETED_HALVES
    if interprets != INTERPRETING:
        sys.exit(f"fusedres.benchmark.kernels_suite: the {options.half} half needs a process "
                 f"{'with' if interprets else 'without'} TRITON_INTERPRET=1")
    cases = [_case_from_json(case) for case in json.loads(options.cases.read_text())]
    options.fields.write_text(json.dumps(HALVES[options.half](cases, options.jobs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
