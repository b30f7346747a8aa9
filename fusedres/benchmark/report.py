"""Writing results: JSON and CSV (one row per level, op, mode, shape, dtype, layout, provider, each with the
environment), a markdown summary, and a PNG plot."""
from __future__ import annotations

import csv
import json
import pathlib

ROW_FIELDS = ["level", "op", "mode", "shape", "dtype", "layout", "provider", "ms", "ms_p20", "ms_p80", "timer",
              "floor_bytes", "gbps", "pct_copy_bw", "speedup_vs_eager", "speedup_vs_compile", "images_per_s",
              "peak_mem_mb", "compile_s", "max_abs_error", "note"]
ENV_FIELDS = ["device", "driver", "cuda", "torch", "triton", "cudnn", "fusedres", "git_commit", "python", "date"]


def add_derived(rows: list[dict], copy_gbps: float | None) -> None:
    """GB/s from the floor bytes, percent of the copy bandwidth, speedups over eager and torch.compile."""
    by_case = {}
    for row in rows:
        by_case.setdefault(_case_key(row), {})[row["provider"]] = row
    for row in rows:
        ms = row.get("ms")
        if ms and row.get("floor_bytes"):  # ops only: blocks and models have no floor byte count
            row["gbps"] = row["floor_bytes"] / (ms * 1e-3) / 1e9
            if copy_gbps:
                row["pct_copy_bw"] = 100.0 * row["gbps"] / copy_gbps
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
    (out / "results.json").write_text(json.dumps({"environment": environment, "copy_gbps": copy_gbps,
                                                  "rows": full}, indent=1))
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


def _fmt(value, spec=".3f"):
    return "" if value is None else format(value, spec)


def markdown_summary(rows: list[dict], environment: dict, copy_gbps: float | None, title: str) -> str:
    lines = [f"## {title}", "",
             f"{environment['device']} · torch {environment['torch']} · triton {environment['triton']} · "
             f"commit {environment['git_commit']} · {environment['date']}"
             + (f" · copy bandwidth {copy_gbps:.0f} GB/s" if copy_gbps else ""), ""]
    cases = {}
    for row in rows:
        cases.setdefault(_case_key(row), {})[row["provider"]] = row
    lines += ["| level | op | mode | shape | dtype | layout | eager ms | compile ms | compile s | fusedres ms "
              "| fusedres GB/s | % copy BW | x eager | x compile | fusedres img/s | eager MB | fusedres MB "
              "| eager max err | fusedres max err |",
              "|" + "---|" * 19]
    for key, providers in cases.items():
        eager, compiled, fused = (providers.get(p, {}) for p in ("eager", "compile", "fusedres"))
        lines.append("| " + " | ".join([*map(str, key), _fmt(eager.get("ms")), _fmt(compiled.get("ms")),
                                        _fmt(compiled.get("compile_s"), ".1f"), _fmt(fused.get("ms")),
                                        _fmt(fused.get("gbps"), ".0f"),
                                        _fmt(fused.get("pct_copy_bw"), ".0f"),
                                        _fmt(fused.get("speedup_vs_eager"), ".2f"),
                                        _fmt(fused.get("speedup_vs_compile"), ".2f"),
                                        _fmt(fused.get("images_per_s"), ".0f"), _fmt(eager.get("peak_mem_mb"), ".0f"),
                                        _fmt(fused.get("peak_mem_mb"), ".0f"),
                                        _fmt(eager.get("max_abs_error"), ".2e"),
                                        _fmt(fused.get("max_abs_error"), ".2e")]) + " |")
    notes = sorted({row["note"] for row in rows if row.get("note")})
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: pathlib.Path, title: str) -> None:
    """Speedup of fusedres (and torch.compile) over eager per case; on a CPU run, fusedres's error against
    eager instead (interpreter times are not speed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r["provider"] != "eager" and r.get("speedup_vs_eager")]
    checked = [r for r in rows if r["provider"] == "fusedres" and r.get("max_abs_error") is not None]
    shown = timed or checked
    labels = sorted({f"{r['op']} {r['mode']}\n{r['shape']}" for r in shown})
    figure, axes = plt.subplots(figsize=(max(6.0, 0.5 * len(labels)), 4.5))
    for offset, provider in enumerate(sorted({r["provider"] for r in shown})):
        values = {f"{r['op']} {r['mode']}\n{r['shape']}": (r.get("speedup_vs_eager") if timed
                                                            else r["max_abs_error"])
                  for r in shown if r["provider"] == provider}
        axes.bar([i + 0.4 * offset for i in range(len(labels))], [values.get(label, 0) for label in labels], width=0.4,
                 label=provider)
    if timed:
        axes.axhline(1.0, color="grey", linewidth=0.8)
        axes.set_ylabel("speedup over eager")
    else:
        if any(r["max_abs_error"] > 0 for r in checked):
            axes.set_yscale("log")
        axes.set_ylabel("max |fusedres - eager| (interpreter)")
    axes.set_xticks(range(len(labels)))
    axes.set_xticklabels(labels, rotation=90, fontsize=6)
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
