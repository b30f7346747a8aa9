"""Writing results: rows.jsonl as they are measured; at the end JSON and CSV (one row per level, op, mode, shape,
dtype, layout, provider, each with the environment), a markdown summary (the timings in one table, the kernels
suite's predictions in another; columns empty on every row left out), and a PNG plot."""
from __future__ import annotations

import csv
import json
import os
import pathlib
from typing import Callable

from .runner import SAVE_MEMORY

# The kernels suite's fields (rows of level "kernel"): the model's prediction (source "prediction"), and on a GPU
# the measured time over the time predicted at the measured copy bandwidth.
KERNEL_FIELDS = ["source", "launches", "kernels", "num_warps", "registers", "occupancy", "local_bytes", "load_bits",
                 "store_bits", "counted_element_bytes", "counted_on", "floor_element_bytes", "eager_element_bytes",
                 "predicted_bytes", "predicted_ms_h100", "predicted_ms_h200", "predicted_ms_measured_copy_bw",
                 "measured_over_predicted"]
ROW_FIELDS = ["level", "op", "mode", "shape", "dtype", "layout", "provider", "ms", "ms_p20", "ms_p80", "timer",
              "floor_bytes", "gbps", "pct_copy_bw", "speedup_vs_eager", "speedup_vs_compile", "images_per_s",
              "peak_mem_mb", "retained_mb", "compile_s", "max_abs_error", *KERNEL_FIELDS, "note"]
ENV_FIELDS = ["device", "driver", "cuda", "torch", "triton", "cudnn", "fusedres", "git_commit", "python", "date"]


class RowLog:
    """``rows.jsonl``: one JSON line per row, appended and flushed as each is measured, so that a run killed before
    its end still leaves its rows."""

    def __init__(self, path: pathlib.Path):
        self.path = path

    def __enter__(self) -> "RowLog":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "w")
        return self

    def append(self, row: dict) -> None:
        self.file.write(json.dumps({k: row.get(k) for k in ROW_FIELDS}) + "\n")
        self.file.flush()

    def __exit__(self, *exc) -> None:
        self.file.close()


def add_derived(rows: list[dict], copy_gbps: float | None) -> None:
    """GB/s from the floor bytes, percent of the copy bandwidth, speedups over eager and torch.compile; for the
    kernels suite, the time predicted at the measured copy bandwidth and the measured time over it."""
    by_case = {}
    for row in rows:
        by_case.setdefault(_case_key(row), {})[row["provider"]] = row
    for row in rows:
        ms = row.get("ms")
        if ms and row.get("floor_bytes"):  # ops only: blocks and models have no floor byte count
            row["gbps"] = row["floor_bytes"] / (ms * 1e-3) / 1e9
            if copy_gbps:
                row["pct_copy_bw"] = 100.0 * row["gbps"] / copy_gbps
        if copy_gbps and row.get("predicted_bytes"):
            row["predicted_ms_measured_copy_bw"] = row["predicted_bytes"] / (copy_gbps * 1e9) * 1e3
            if ms:
                row["measured_over_predicted"] = ms / row["predicted_ms_measured_copy_bw"]
        if ms:
            peers = by_case[_case_key(row)]
            for name, field in (("eager", "speedup_vs_eager"), ("compile", "speedup_vs_compile")):
                if peers.get(name, {}).get("ms"):
                    row[field] = peers[name]["ms"] / ms


def _case_key(row):
    return (row["level"], row["op"], row["mode"], row["shape"], row["dtype"], row["layout"])


def write_all(rows: list[dict], environment: dict, out: pathlib.Path, *, copy_gbps: float | None,
              title: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    full = [{**{k: row.get(k) for k in ROW_FIELDS}, **environment} for row in rows]
    partial = out / "results.json.partial"  # moved into place whole: a run killed while writing leaves no half file
    partial.write_text(json.dumps({"environment": environment, "copy_gbps": copy_gbps, "rows": full}, indent=1))
    os.replace(partial, out / "results.json")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ROW_FIELDS + ENV_FIELDS)
        writer.writeheader()
        writer.writerows(full)
    summary = markdown_summary(rows, environment, copy_gbps, title)
    (out / "summary.md").write_text(summary)
    try:
        plot(rows, out / "speedup.png", title)
    except ImportError as missing:
        print(f"fusedres-bench: no plot: {missing}")
    return summary


def _fmt(value, spec=""):
    return "" if value is None else format(value, spec)


def _table(columns: list[tuple[str, Callable]], items: list) -> list[str]:
    """A markdown table, one column per ``(heading, cell of an item)``, leaving out the columns empty on every row
    (those a CPU run cannot fill, for one)."""
    cells = [[cell(item) for _, cell in columns] for item in items]
    kept = [i for i in range(len(columns)) if any(row[i] for row in cells)]
    return (["| " + " | ".join(columns[i][0] for i in kept) + " |", "|" + "---|" * len(kept)]
            + ["| " + " | ".join(row[i] for i in kept) + " |" for row in cells])


def _of_provider(provider: str, field: str, spec: str) -> Callable:
    """A timing-table cell: ``field`` of ``provider``'s row in a ``(case key, rows by provider)`` item."""
    return lambda item: _fmt(item[1].get(provider, {}).get(field), spec)


def _of_row(field: str, spec: str = "") -> Callable:
    return lambda row: _fmt(row.get(field), spec)


CASE_COLUMNS = ("level", "op", "mode", "shape", "dtype", "layout")
TIMING_COLUMNS = [
    *((heading, lambda item, index=index: str(item[0][index])) for index, heading in enumerate(CASE_COLUMNS)),
    ("eager ms", _of_provider("eager", "ms", ".3f")), ("compile ms", _of_provider("compile", "ms", ".3f")),
    ("compile s", _of_provider("compile", "compile_s", ".1f")), ("fusedres ms", _of_provider("fusedres", "ms", ".3f")),
    ("fusedres GB/s", _of_provider("fusedres", "gbps", ".0f")),
    ("% copy BW", _of_provider("fusedres", "pct_copy_bw", ".0f")),
    ("x eager", _of_provider("fusedres", "speedup_vs_eager", ".2f")),
    ("x compile", _of_provider("fusedres", "speedup_vs_compile", ".2f")),
    ("fusedres img/s", _of_provider("fusedres", "images_per_s", ".0f")),
    ("save_memory ms", _of_provider(SAVE_MEMORY, "ms", ".3f")),
    ("eager MB", _of_provider("eager", "peak_mem_mb", ".0f")),
    ("fusedres MB", _of_provider("fusedres", "peak_mem_mb", ".0f")),
    ("save_memory MB", _of_provider(SAVE_MEMORY, "peak_mem_mb", ".0f")),
    # what a training forward keeps for the backward (measured from the allocator; activations, not parameters)
    ("eager kept MB", _of_provider("eager", "retained_mb", ".2f")),
    ("fusedres kept MB", _of_provider("fusedres", "retained_mb", ".2f")),
    ("save_memory kept MB", _of_provider(SAVE_MEMORY, "retained_mb", ".2f")),
    ("eager max err", _of_provider("eager", "max_abs_error", ".2e")),
    ("fusedres max err", _of_provider("fusedres", "max_abs_error", ".2e")),
    ("save_memory max err", _of_provider(SAVE_MEMORY, "max_abs_error", ".2e")),
]
KERNEL_COLUMNS = [
    *((heading, _of_row(heading)) for heading in CASE_COLUMNS[1:]),
    ("launches", _of_row("launches")), ("kernels", _of_row("kernels")), ("warps", _of_row("num_warps")),
    ("regs", _of_row("registers")), ("occupancy", _of_row("occupancy", ".0%")), ("local B", _of_row("local_bytes")),
    ("load bits", _of_row("load_bits")), ("store bits", _of_row("store_bits")),
    ("counted B/elem", _of_row("counted_element_bytes", ".3f")), ("counted on", _of_row("counted_on")),
    ("floor B/elem", _of_row("floor_element_bytes")), ("eager B/elem", _of_row("eager_element_bytes")),
    ("predicted ms H100", _of_row("predicted_ms_h100", ".3f")),
    ("predicted ms H200", _of_row("predicted_ms_h200", ".3f")),
    ("predicted ms at measured copy BW", _of_row("predicted_ms_measured_copy_bw", ".3f")),
    ("measured ms", _of_row("ms", ".3f")), ("measured / predicted", _of_row("measured_over_predicted", ".2f")),
]
KERNELS_HEADING = ("### Kernels: prediction from the model (compiled for sm_90 without a GPU; bytes counted in "
                   "Triton's interpreter), not a measurement")


def _kernels_section(rows: list[dict]) -> list[str]:
    from fusedres.report.kernel_report import PEAK_BANDWIDTH_GBPS

    peaks = ", ".join(f"{gpu} {gbps:.0f} GB/s" for gpu, gbps in PEAK_BANDWIDTH_GBPS.items())
    lines = [KERNELS_HEADING, "",
             "Bytes per element in element sizes, counted on the proxy named in \"counted on\" (same dtype, layout "
             "and H x W, at most 16 channels, with the interpreter's launch constants: fewer programs, so fewer "
             "partial rows than on a GPU), against the floor of the fused design and what eager PyTorch moves. "
             f"Predicted ms: those bytes at the full shape over a spec-sheet bandwidth ({peaks}). Occupancy: "
             "theoretical, from registers and shared memory."]
    if any(row.get("ms") for row in rows):
        lines[-1] += (" Measured ms: do_bench on this GPU, the only measurement in this table; measured / "
                      "predicted divides it by the time predicted at the measured copy bandwidth.")
    return lines + [""] + _table(KERNEL_COLUMNS, rows)


def markdown_summary(rows: list[dict], environment: dict, copy_gbps: float | None, title: str) -> str:
    lines = [f"## {title}", "",
             f"{environment['device']} · torch {environment['torch']} · triton {environment['triton']} · "
             f"commit {environment['git_commit']} · {environment['date']}"
             + (f" · copy bandwidth {copy_gbps:.0f} GB/s" if copy_gbps else ""), ""]
    cases = {}
    for row in rows:
        if row["level"] != "kernel":
            cases.setdefault(_case_key(row), {})[row["provider"]] = row
    if cases:
        lines += _table(TIMING_COLUMNS, list(cases.items())) + [""]
    kernel_rows = [row for row in rows if row["level"] == "kernel"]
    if kernel_rows:
        lines += _kernels_section(kernel_rows) + [""]
    notes = sorted({row["note"] for row in rows if row.get("note")})
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines).rstrip("\n") + "\n"


def _plotted(rows: list[dict]) -> tuple[list[dict], Callable, str, bool]:
    """What the plot shows, its axis label and whether it is a ratio (else an error): the speedups over eager; else
    (a CPU run) fusedres's error against eager; else (the kernels suite alone) the measured time over the predicted
    one (GPU), or the bytes counted over the floor."""
    timings = [r for r in rows if r["level"] != "kernel"]
    kernels = [r for r in rows if r["level"] == "kernel"]
    timed = [r for r in timings if r["provider"] != "eager" and r.get("speedup_vs_eager")]
    if timed:
        return timed, lambda r: r["speedup_vs_eager"], "speedup over eager", True
    checked = [r for r in timings if r["provider"] == "fusedres" and r.get("max_abs_error") is not None]
    if checked:
        return checked, lambda r: r["max_abs_error"], "max |fusedres - eager| (interpreter)", False
    measured = [r for r in kernels if r.get("measured_over_predicted")]
    if measured:
        return (measured, lambda r: r["measured_over_predicted"],
                "measured / predicted ms (at copy BW)", True)
    counted = [r for r in kernels if r.get("counted_element_bytes")]
    return (counted, lambda r: r["counted_element_bytes"] / r["floor_element_bytes"],
            "bytes counted / floor (prediction)", True)


def plot(rows: list[dict], path: pathlib.Path, title: str) -> None:
    """One bar per case and provider of what ``_plotted`` picks; a grey line at 1 for the ratios, a log scale for
    the errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown, value, ylabel, ratio = _plotted(rows)
    label = lambda r: f"{r['op']} {r['mode']}\n{r['shape']} {r['dtype']} {r['layout']}"  # noqa: E731
    labels = sorted({label(r) for r in shown})
    figure, axes = plt.subplots(figsize=(max(6.0, 0.5 * len(labels)), 4.5))
    for offset, provider in enumerate(sorted({r["provider"] for r in shown})):
        values = {label(r): value(r) for r in shown if r["provider"] == provider}
        axes.bar([i + 0.4 * offset for i in range(len(labels))], [values.get(text, 0) for text in labels], width=0.4,
                 label=provider)
    if ratio:
        axes.axhline(1.0, color="grey", linewidth=0.8)
    elif any(value(r) > 0 for r in shown):
        axes.set_yscale("log")
    axes.set_ylabel(ylabel)
    axes.set_xticks(range(len(labels)))
    axes.set_xticklabels(labels, rotation=90, fontsize=6)
    axes.set_title(title, fontsize=9)
    if shown:
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
