"""What every suite shares: the settings of a run, the progress bar, and measuring one provider on one case
(GPU: do_bench, compile time apart, peak memory; CPU: torch.utils.benchmark)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .timing import copies_needed, cpu_time, gpu_time, rotating


# The models suite's provider converted with save_memory=True (fusedres.memory); the other suites have no such
# provider (their ops keep nothing for long).
SAVE_MEMORY = "fusedres (save_memory)"


@dataclass
class Settings:
    device: torch.device
    dtypes: list
    layouts: list[str]
    providers: list[str]
    batch_size: int
    quick: bool
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    activation: str = "relu"  # the ops suite's activation
    sites: str = "resnet50"  # the ops suite's site table (cases.SITES)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


def progress(total: int, what: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=f"fusedres-bench {what}", unit="case")
    except ImportError:
        class Plain:
            def __init__(self):
                self.done = 0

            def update(self, n=1):
                self.done += n
                print(f"\rfusedres-bench {what}: {self.done}/{total} cases", end="", flush=True)

            def close(self):
                print()
        return Plain()


def case_rows(base: dict, rows: Callable[[], list[dict]]) -> list[dict]:
    """``rows()``, the rows of one case; if the case fails, one row naming the failure instead: one case must not
    end the suite (an interrupt still does)."""
    try:
        return rows()
    except Exception as error:
        return [dict(base, provider="(case)", note=f"{base['level']} {base['op']} {base['mode']} {base['shape']} "
                                                   f"{base['dtype']} {base['layout']} failed: "
                                                   f"{type(error).__name__}: {str(error)[:200]}")]


def rows_of_cases(cases: list, what: str, rows_of: Callable) -> Iterator[dict]:
    """Each case's rows as soon as they are measured, behind a progress bar: ``rows_of(case)`` gives ``(base,
    compute)``, the case's identifying fields and a callable returning its rows (``case_rows`` turns a failure
    into a row)."""
    bar = progress(len(cases), what)
    try:
        for case in cases:
            base, compute = rows_of(case)
            yield from case_rows(base, compute)
            bar.update(1)
    finally:
        bar.close()


def fresh_compile(fn: Callable) -> Callable:
    """torch.compile as docs/design.md says: default mode, static shapes, a clean cache per case so that the
    recompile limit never silently turns it into eager."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def measure_gpu(row: dict, make: Callable[[int], Callable], settings: Settings, *, compiled: bool,
                input_bytes: int | None) -> dict:
    """Time ``make(i)()`` (input set ``i``) with do_bench, rotating input sets when they are smaller than twice
    the L2 (``input_bytes`` None: no rotation); the first call of a compiled provider is its compile time. A
    failure is recorded in the row, not raised: one provider must not sink the sweep."""
    try:
        if compiled:
            started = time.perf_counter()
            make(0)()
            torch.cuda.synchronize()
            row["compile_s"] = time.perf_counter() - started
        copies = 1 if input_bytes is None else copies_needed(input_bytes, settings.device)
        run = rotating(make, copies)
        timing = gpu_time(run, warmup_ms=settings.warmup_ms, rep_ms=settings.rep_ms)
        row.update(ms=timing.ms, ms_p20=timing.ms_p20, ms_p80=timing.ms_p80, timer=timing.timer)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(settings.device)
        baseline = torch.cuda.memory_allocated(settings.device)
        run()
        torch.cuda.synchronize()
        row["peak_mem_mb"] = (torch.cuda.max_memory_allocated(settings.device) - baseline) / 2**20
    except Exception as error:
        row["note"] = f"{row['provider']} {row['op']} {row['mode']} failed: {type(error).__name__}: {str(error)[:160]}"
    return row


def measure_cpu(row: dict, fn: Callable, settings: Settings) -> dict:
    timing = cpu_time(fn, min_run_time=0.05 if settings.quick else 0.2)
    row.update(ms=timing.ms, ms_p20=timing.ms_p20, ms_p80=timing.ms_p80, timer=timing.timer)
    return row


def max_error(result, reference) -> float:
    """Largest |result - reference| over matching tensors (NaN-safe; None entries skipped)."""
    pairs = zip(_tensors(result), _tensors(reference))
    return max((float((a.detach().double() - b.detach().double()).abs().nan_to_num(0.0).max()) if a.numel() else 0.0
                for a, b in pairs), default=0.0)


def _tensors(result):
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for t in result if t is not None]


INTERPRETER_NOTE = ("CPU run: fusedres ran in Triton's interpreter; its error against eager PyTorch on float64 "
                    "copies of the inputs is reported, not its time")
