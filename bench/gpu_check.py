"""The prepared GPU run: everything a short GPU lease should bring back, in priority order, under one deadline.

    bash bench/gpu_check.sh [--deadline SECONDS] [--out DIR] [--dry-run]   # the run (default deadline 420 s)
    bash bench/gpu_check.sh prepare                                       # record the commit for a copy without .git
    bash bench/gpu_check.sh unpack ARCHIVE                                # into bench/results/<gpu>-<date>/

Steps, most important first (docs/design.md, "The GPU machine"): preflight (imports, CUDA, versions, the GPU, the
commit; stops the run in seconds when something is missing), smoke (each op once against eager), the race-critical
GPU tests (the merges, bitwise determinism, two streams, no host sync, CUDA graphs), the ops suite (eager and
fusedres), the kernels suite (measured against the prediction), the ResNet-sized shape matrix, then, as time allows,
the torch.compile provider, fp32 NCHW, blocks, models, numerics, and compute-sanitizer's memcheck over the smoke
tests. Each step runs in its own process under ``timeout -s INT -k 15`` with ``min(its cap, time left - 20 s)``: an
interrupted benchmark still writes the rows it measured. Each step logs its wall time and the Triton cache's
entries before and after (the compile work, for sizing later limits).

Everything lands in one work folder, packed after every step into ``gpu_check.tar.gz`` under the output folder
(``$OUT`` when set, else ``--out``), beside ``summary.txt`` (one line per step: status, time, headline numbers):
two files, whatever happens to the later steps.

``--dry-run`` runs the same steps, deadline and packing on the CPU (Triton's interpreter, tiny shapes; no GPU is
used even where one exists): it proves the plumbing, and nothing it times is a GPU measurement.

Standard library only: this must run, and say what is wrong, even where torch does not import.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARCHIVE = "gpu_check.tar.gz"
SUMMARY = "summary.txt"
COMMIT_FILE = ROOT / "bench" / "COMMIT"  # written by `prepare`; git-ignored, so it travels only when carried
DEFAULT_DEADLINE_S = 420
DRY_RUN_DEADLINE_S = 175
MARGIN_S = 20  # kept back from every step's limit: packing, and the next step's start
MIN_STEP_S = 10  # a step that would get less is not started
KILL_AFTER_S = 15  # after the INT, timeout's KILL
NO_TIME = "no time left"


@dataclass
class Run:
    """What every step's command needs to know about this run."""

    python: str
    dry_run: bool
    work: pathlib.Path
    cores: int

    def pytest(self, name: str, *args: str, workers: int = 0, per_test_s: int = 0) -> list[str]:
        command = [self.python, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                   f"--junitxml={self.work / (name + '.junit.xml')}", *args]
        if workers > 1 and not self.dry_run and importlib.util.find_spec("xdist"):  # a dry run skips them all
            command += ["-n", str(min(workers, self.cores))]
        if per_test_s and importlib.util.find_spec("pytest_timeout"):
            command += [f"--timeout={per_test_s}"]
        return command

    def bench(self, name: str, *args: str, batch: int = 128) -> list[str]:
        """fusedres-bench into the work folder; a dry run lets the CPU mode pick its small shapes."""
        batch_args = [] if self.dry_run else ["--batch-size", str(batch)]
        return [self.python, "-m", "fusedres.benchmark.cli", *args, *batch_args, "--out", str(self.work / name)]


@dataclass
class Step:
    name: str
    cap_s: int  # the most this step may take on a GPU (a dry run: dry_cap_s)
    dry_cap_s: int
    command: Callable[[Run], list[str] | None]  # None: skipped, see ``skip_reason``
    headline: Callable[[Run, "Step", str], str]
    skip_reason: Callable[[Run], str | None] = lambda run: None
    essential: bool = False  # the run stops when this step fails
    env: dict = field(default_factory=dict)  # this step's own environment variables


# --- Headlines: the numbers a step's line in summary.txt shows ---------------------------------------------


def _pytest_headline(run: Run, step: Step, log: str) -> str:
    counts = re.findall(r"^=*\s*((?:\d+ \w+(?:, )?)+) in [\d.]+s", log, re.MULTILINE)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", log, re.MULTILINE)
    text = counts[-1] if counts else "no pytest summary (cut short?)"
    return text + (f"; failed: {', '.join(failed[:3])}" + (" ..." if len(failed) > 3 else "") if failed else "")


def bench_rows(folder: pathlib.Path) -> list[dict]:
    """A benchmark folder's rows: results.json (derived fields included), else rows.jsonl (a run killed hard)."""
    try:
        return json.loads((folder / "results.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):  # absent, or cut off by a KILL while being written
        pass
    rows = []
    try:
        lines = (folder / "rows.jsonl").read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:  # the last line, cut off
            pass
    return rows


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _bench_headline(run: Run, step: Step, log: str) -> str:
    rows = bench_rows(run.work / step.name)
    if not rows:
        return "no rows"
    fused = [r for r in rows if r.get("provider") == "fusedres"]
    failures = [r for r in rows if "failed" in (r.get("note") or "")]
    parts = [f"{len(rows)} rows"]
    for label, field_name, spec in (("fusedres/eager speedup, median", "speedup_vs_eager", ".2f"),
                                    ("fusedres/compile speedup, median", "speedup_vs_compile", ".2f"),
                                    ("% of copy BW, median", "pct_copy_bw", ".0f"),
                                    ("measured/predicted, median", "measured_over_predicted", ".2f")):
        value = _median(r.get(field_name) for r in fused)
        if value is not None:
            parts.append(f"{label} {value:{spec}}")
    errors = [r.get("max_abs_error") for r in fused if r.get("max_abs_error") is not None]
    if errors:
        parts.append(f"fusedres max error vs fp64 {max(errors):.1e}")
    if failures:
        parts.append(f"{len(failures)} failed (see the log)")
    return "; ".join(parts)


def _preflight_headline(run: Run, step: Step, log: str) -> str:
    lines = [line for line in log.splitlines() if line.startswith("preflight:")]
    return lines[-1].removeprefix("preflight:").strip() if lines else "no answer"


def _memcheck_headline(run: Run, step: Step, log: str) -> str:
    found = re.findall(r"ERROR SUMMARY: .*", log)
    return (found[-1] if found else "no sanitizer summary") + "; " + _pytest_headline(run, step, log)


# --- The steps ---------------------------------------------------------------------------------------------

PREFLIGHT = r"""
import importlib.metadata, importlib.util, os, sys
dry = os.environ.get("GPU_CHECK_DRY_RUN") == "1"
try:
    import torch, triton
    import fusedres
except Exception as error:
    sys.exit(f"preflight: cannot import what the run needs: {type(error).__name__}: {error}")
missing = [name for name in ("pytest",) if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"preflight: {', '.join(missing)} missing: the test steps cannot run")
cuda = torch.cuda.is_available()
print(f"python {sys.version.split()[0]}; torch {torch.__version__}; triton {triton.__version__}; "
      f"cuda {torch.version.cuda}; fusedres {fusedres.__version__}")
absent = []
for name in ("torchvision", "timm", "pytest", "pytest-xdist", "pytest-timeout", "hypothesis", "matplotlib",
             "scikit-learn", "tqdm"):
    try:
        print(f"  {name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        absent.append(name)
        print(f"  {name}: missing")
if not dry and not cuda:
    sys.exit("preflight: torch sees no CUDA GPU; nothing here can be measured (a CPU check is --dry-run)")
where = ("dry run on the CPU (Triton's interpreter; nothing timed here is a GPU measurement)" if dry
         else torch.cuda.get_device_name(0))
note = "" if not absent else f"; missing {', '.join(absent)}" + (
    " (tests run without per-test timeouts)" if "pytest-timeout" in absent else "")
print(f"preflight: {where}; torch {torch.__version__}, triton {triton.__version__}, commit "
      f"{os.environ.get('FUSEDRES_COMMIT', 'unknown')}{note}")
"""


def _memcheck_skip(run: Run) -> str | None:
    if run.dry_run:
        return "dry run: compute-sanitizer checks GPU memory accesses"
    return None if _sanitizer() else "no compute-sanitizer on this machine"


def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    for candidate in ([found] if found else []) + ["/usr/local/cuda/bin/compute-sanitizer"]:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _memcheck(run: Run) -> list[str] | None:
    sanitizer = _sanitizer()
    return None if sanitizer is None else [sanitizer, "--tool", "memcheck", "--error-exitcode", "99",
                                           *run.pytest("memcheck", "tests/test_smoke.py", "-k", "training")]


# Caps: on a GPU, from the compile work each step holds (Triton 3.6 compiles a specialisation in 0.2-1 s for sm_90,
# plus a launcher per signature) and its timed cases; in a dry run, from the interpreter's cost on 2 cores.
STEPS = [
    Step("preflight", 60, 30, lambda run: [run.python, "-c", PREFLIGHT], _preflight_headline, essential=True),
    Step("smoke", 90, 30, lambda run: run.pytest("smoke", "tests/test_smoke.py"), _pytest_headline),
    Step("race-tests", 150, 30, lambda run: run.pytest("race-tests", "tests/test_merges.py", "tests/test_gpu.py",
                                                       per_test_s=120), _pytest_headline),
    Step("ops-bf16-channels_last", 90, 30,
         lambda run: run.bench("ops-bf16-channels_last", "--suite", "ops", "--quick", "--dtype", "bf16",
                               "--layout", "channels_last", "--providers", "eager,fusedres"), _bench_headline),
    Step("kernels-bf16-channels_last", 75, 45,
         lambda run: run.bench("kernels-bf16-channels_last", "--suite", "kernels", "--quick", "--dtype", "bf16",
                               "--layout", "channels_last", "--warmup-ms", "10", "--rep-ms", "50"),
         _bench_headline),
    Step("large-shapes", 150, 20, lambda run: run.pytest("large-shapes", "tests/test_gpu_shapes.py", workers=8,
                                                         per_test_s=120), _pytest_headline),
    Step("ops-compile", 150, 20,
         lambda run: run.bench("ops-compile", "--suite", "ops", "--quick", "--dtype", "bf16", "--layout",
                               "channels_last", "--ops", "batch_norm_relu,batch_norm_add_relu", "--providers",
                               "eager,compile,fusedres"), _bench_headline),
    Step("ops-fp32-nchw", 60, 20,
         lambda run: run.bench("ops-fp32-nchw", "--suite", "ops", "--quick", "--dtype", "fp32", "--layout", "nchw",
                               "--providers", "eager,fusedres", batch=64), _bench_headline),
    Step("blocks", 90, 25,
         lambda run: run.bench("blocks", "--suite", "blocks", "--quick", "--dtype", "bf16", "--layout",
                               "channels_last", "--providers", "eager,fusedres"), _bench_headline),
    Step("models", 120, 45,
         lambda run: run.bench("models", "--suite", "models", "--quick", "--dtype", "bf16", "--layout",
                               "channels_last", "--providers", "eager,fusedres"), _bench_headline),
    Step("numerics", 60, 35,
         lambda run: run.bench("numerics", "--suite", "numerics",
                               *(["--numerics-steps", "2", "--numerics-batch-size", "4"] if run.dry_run
                                 else ["--numerics-steps", "100"])), _bench_headline),
    # Without the caching allocator every tensor is its own allocation, so that an access past its end is caught.
    Step("memcheck", 120, 10, _memcheck, _memcheck_headline, skip_reason=_memcheck_skip,
         env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}),
]


# --- Running them ------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    status: str  # ok | FAILED (exit N) | cut short (limit N s) | killed | skipped: why
    wall_s: float = 0.0
    limit_s: int = 0
    cache_before: int | None = None
    cache_after: int | None = None
    headline: str = ""


@dataclass
class Report:
    label: str
    commit: str
    deadline_s: int
    started: float
    dry_run: bool
    started_at: str = field(default_factory=lambda: f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%MZ}")
    stopped: str | None = None  # why the run stopped early (a failed preflight)
    outcomes: list[Outcome] = field(default_factory=list)

    def exit_status(self) -> int:
        """0: every step passed (or was skipped for what this machine lacks); 1: a step failed or a preflight
        stopped the run; 3 (incomplete): nothing failed, but steps were cut short or left out for time."""
        if any(o.status.startswith(("FAILED", "killed")) for o in self.outcomes) or self.stopped:
            return 1
        return 3 if any(o.status.startswith("cut short") or o.headline.startswith(NO_TIME) for o in self.outcomes) \
            else 0

    def text(self) -> str:
        kind = ("DRY RUN on the CPU: Triton's interpreter, tiny shapes; nothing here is a GPU measurement"
                if self.dry_run else "GPU run")
        used = time.monotonic() - self.started
        lines = [f"fusedres gpu_check · {self.label} · {kind}",
                 f"commit {self.commit} · started {self.started_at} · deadline {self.deadline_s} s, used {used:.0f} s; "
                 f"exit status {self.exit_status()} (0 passed, 1 failed, 3 incomplete)", "",
                 f"{'step':<28} {'status':<26} {'wall s':>7} {'limit s':>7} {'triton cache':>13}  headline"]
        for o in self.outcomes:
            cache = "" if o.cache_before is None else f"{o.cache_before} -> {o.cache_after}"
            lines.append(f"{o.name:<28} {o.status:<26} {o.wall_s:>7.1f} {o.limit_s:>7} {cache:>13}  {o.headline}")
        lines += ["", f"Everything else is in {ARCHIVE} ({self.label}/: <step>.log, junit XML, benchmark folders); "
                      f"unpack it with `bash bench/gpu_check.sh unpack {ARCHIVE}`."]
        return "\n".join(lines) + "\n"


def triton_cache_entries() -> int | None:
    folder = pathlib.Path(os.environ.get("TRITON_CACHE_DIR") or pathlib.Path.home() / ".triton" / "cache")
    try:
        return sum(1 for entry in folder.iterdir() if entry.is_dir())
    except OSError:
        return 0 if not folder.exists() else None


def run_step(step: Step, run: Run, limit_s: int, env: dict) -> Outcome:
    outcome = Outcome(step.name, "ok", limit_s=limit_s, cache_before=triton_cache_entries())
    command = step.command(run)
    log_path = run.work / f"{step.name}.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(command)}\n# limit {limit_s} s (timeout -s INT -k {KILL_AFTER_S})\n")
        log.flush()
        code = subprocess.run(["timeout", "-s", "INT", "-k", str(KILL_AFTER_S), str(limit_s), *command],
                              stdout=log, stderr=subprocess.STDOUT, env={**env, **step.env}, cwd=ROOT).returncode
    outcome.wall_s = time.monotonic() - started
    outcome.cache_after = triton_cache_entries()
    if code == 124:
        outcome.status = f"cut short (limit {limit_s} s)"
    elif code in (137, -9):
        outcome.status = "killed (no answer to INT)"
    elif code != 0:
        outcome.status = f"FAILED (exit {code})"
    try:
        outcome.headline = step.headline(run, step, log_path.read_text(errors="replace"))
    except Exception as error:  # a headline must never cost the run its later steps
        outcome.headline = f"unreadable results: {type(error).__name__}: {error}"
    with open(log_path, "a") as log:
        log.write(f"\n# {step.name}: {outcome.status}; wall {outcome.wall_s:.1f} s; triton cache entries "
                  f"{outcome.cache_before} -> {outcome.cache_after}\n")
    return outcome


def pack(work: pathlib.Path, out: pathlib.Path, report: Report) -> None:
    """summary.txt beside the archive and inside it; the archive rewritten whole, then moved into place."""
    text = report.text()
    (work / SUMMARY).write_text(text)
    partial = out / (ARCHIVE + ".partial")
    with tarfile.open(partial, "w:gz") as archive:
        archive.add(work, arcname=work.name)
    os.replace(partial, out / ARCHIVE)
    (out / SUMMARY).write_text(text)


def commit_under_test() -> str:
    """FUSEDRES_COMMIT if set; else git's HEAD (``-dirty`` with uncommitted changes); else what `prepare`
    recorded in bench/COMMIT (a copy without .git); else unknown."""
    if os.environ.get("FUSEDRES_COMMIT"):
        return os.environ["FUSEDRES_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=20)
        if head.returncode == 0 and head.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=20).stdout.strip()
            return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return COMMIT_FILE.read_text().strip() if COMMIT_FILE.exists() else "unknown"


def gpu_label(dry_run: bool) -> str:
    date = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}"
    if dry_run:
        return f"dry-run-cpu-{date}"
    try:
        name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        name = "unknown-gpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-") + f"-{date}"


def check(options: argparse.Namespace) -> int:
    out = pathlib.Path(options.out or os.environ.get("OUT") or "gpu-check-out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    stale = [p.name for p in out.iterdir() if p.name in (ARCHIVE, SUMMARY)]
    for name in stale:
        (out / name).unlink()
    deadline = options.deadline or (DRY_RUN_DEADLINE_S if options.dry_run else DEFAULT_DEADLINE_S)
    report = Report(gpu_label(options.dry_run), commit_under_test(), deadline, time.monotonic(), options.dry_run)
    work = pathlib.Path(tempfile.mkdtemp(prefix="fusedres-gpu-check-")) / report.label
    work.mkdir()
    run = Run(python=sys.executable, dry_run=options.dry_run, work=work, cores=os.cpu_count() or 1)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), FUSEDRES_COMMIT=report.commit,
        GPU_CHECK_DRY_RUN="1" if options.dry_run else "0")
    if options.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path everywhere, even on a machine with a GPU
    (work / "nvidia-smi.txt").write_text(_nvidia_smi())
    selected = [s for s in STEPS if not options.only or s.name in options.only]
    print(f"gpu_check: {report.label}, commit {report.commit}, deadline {deadline} s -> {out}/{ARCHIVE}, "
          f"{out}/{SUMMARY}", flush=True)
    for step in selected:
        left = deadline - (time.monotonic() - report.started)
        limit = int(min(step.dry_cap_s if options.dry_run else step.cap_s, left - MARGIN_S))
        reason = report.stopped or step.skip_reason(run) or (None if limit >= MIN_STEP_S else
                                                             f"{NO_TIME} ({left:.0f} s of the deadline)")
        if reason:
            outcome = Outcome(step.name, "skipped", headline=reason)
        else:
            print(f"gpu_check: {step.name} (limit {limit} s) ...", flush=True)
            outcome = run_step(step, run, limit, env)
            if step.essential and outcome.status != "ok":
                report.stopped = f"{step.name} failed: {outcome.headline}"
        print(f"gpu_check: {step.name}: {outcome.status} {outcome.wall_s:.0f} s · {outcome.headline}", flush=True)
        report.outcomes.append(outcome)
        pack(work, out, report)
    print("\n" + report.text(), flush=True)
    return report.exit_status()


def _nvidia_smi() -> str:
    try:
        return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return f"nvidia-smi: {error}\n"


# --- prepare and unpack ------------------------------------------------------------------------------------


def prepare(options: argparse.Namespace) -> int:
    commit = commit_under_test()
    COMMIT_FILE.write_text(commit + "\n")
    print(f"gpu_check: {COMMIT_FILE.relative_to(ROOT)} = {commit} (git-ignored: carry it to a copy without .git, "
          f"or pass FUSEDRES_COMMIT={commit})")
    return 0


def measured_against_predicted(folder: pathlib.Path) -> str:
    """Markdown for bench/NOTES.md: the kernels suite's measured time beside its prediction, and the ops suite's
    fusedres against eager, from an unpacked run."""
    lines = []
    kernels = [r for path in sorted(folder.glob("kernels-*")) for r in bench_rows(path) if r.get("level") == "kernel"]
    if kernels:
        lines += ["| op | mode | shape | dtype | layout | predicted ms (H200 spec) | predicted ms (measured copy BW) | "
                  "measured ms | measured / predicted |", "|---|---|---|---|---|---|---|---|---|"]
        for r in kernels:
            cells = [r["op"], r["mode"], r["shape"], r["dtype"], r["layout"]]
            cells += [_cell(r.get(k), ".3f") for k in ("predicted_ms_h200", "predicted_ms_measured_copy_bw", "ms")]
            lines.append("| " + " | ".join(cells + [_cell(r.get("measured_over_predicted"), ".2f")]) + " |")
        lines.append("")
    ops = [r for path in sorted(folder.glob("ops-*")) for r in bench_rows(path) if r.get("provider") == "fusedres"]
    if ops:
        lines += ["| op | mode | shape | dtype | layout | fusedres ms | x eager | x compile | % copy BW |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in ops:
            cells = [r["op"], r["mode"], r["shape"], r["dtype"], r["layout"], _cell(r.get("ms"), ".3f"),
                     _cell(r.get("speedup_vs_eager"), ".2f"), _cell(r.get("speedup_vs_compile"), ".2f"),
                     _cell(r.get("pct_copy_bw"), ".0f")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def unpack(options: argparse.Namespace) -> int:
    into = pathlib.Path(options.into).resolve()
    with tarfile.open(options.archive) as archive:
        members = archive.getmembers()
        roots = {pathlib.PurePosixPath(m.name).parts[0] for m in members}
        unsafe = [m.name for m in members if m.name.startswith("/") or ".." in pathlib.PurePosixPath(m.name).parts
                  or not (m.isfile() or m.isdir())]
        if len(roots) != 1 or unsafe:
            sys.exit(f"gpu_check unpack: expected one folder of plain files, got roots {sorted(roots)}, "
                     f"unsafe {unsafe[:3]}")
        (label,) = roots
        if (into / label).exists() and not options.replace:
            sys.exit(f"gpu_check unpack: {into / label} exists (--replace to overwrite it)")
        if (into / label).exists():
            shutil.rmtree(into / label)
        archive.extractall(into, members=members)
    folder = into / label
    table = measured_against_predicted(folder)
    (folder / "measured-against-predicted.md").write_text(table)
    print(f"gpu_check: unpacked into {folder}\n")
    print((folder / SUMMARY).read_text() if (folder / SUMMARY).exists() else "(no summary.txt)")
    print(table)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    parser.add_argument("--deadline", type=int, default=None,
                        help=f"seconds for every step together (default {DEFAULT_DEADLINE_S}; a dry run: "
                             f"{DRY_RUN_DEADLINE_S})")
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else gpu-check-out)")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU, tiny shapes")
    parser.add_argument("--only", type=lambda text: text.split(","), default=None,
                        help="comma-separated step names: " + ", ".join(s.name for s in STEPS))
    sub.add_parser("prepare", help="record the commit in bench/COMMIT for a copy without .git")
    unpacking = sub.add_parser("unpack", help="unpack an archive into bench/results/<gpu>-<date>/")
    unpacking.add_argument("archive")
    unpacking.add_argument("--into", default=str(ROOT / "bench" / "results"))
    unpacking.add_argument("--replace", action="store_true")
    options = parser.parse_args(argv)
    if options.command == "prepare":
        return prepare(options)
    if options.command == "unpack":
        return unpack(options)
    if options.only:
        unknown = set(options.only) - {s.name for s in STEPS}
        if unknown:
            parser.error(f"--only: unknown steps {sorted(unknown)}")
    if shutil.which("timeout") is None:
        sys.exit("gpu_check: needs coreutils' timeout")
    return check(options)


if __name__ == "__main__":
    sys.exit(main())
