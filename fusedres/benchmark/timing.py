"""Timers. GPU: ``triton.testing.do_bench`` (L2 flushed before every run; warm-up and rep in milliseconds),
reporting the median and the 20th/80th percentiles. CPU: ``torch.utils.benchmark``, labelled as such."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    ms: float
    ms_p20: float
    ms_p80: float
    timer: str


def gpu_time(fn: Callable, *, warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    import triton.testing

    median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return Timing(median, p20, p80, "triton.testing.do_bench")


def cpu_time(fn: Callable, *, min_run_time: float = 0.2) -> Timing:
    import torch.utils.benchmark as benchmark

    measurement = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    times = sorted(measurement.times)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))] * 1e3  # noqa: E731
    return Timing(measurement.median * 1e3, pick(0.2), pick(0.8), "torch.utils.benchmark (CPU)")


def rotating(make_callable: Callable[[int], Callable], copies: int) -> Callable:
    """One callable cycling over ``copies`` independent input sets, so that an input smaller than the L2
    cache is not served from it by the previous run."""
    callables = [make_callable(i) for i in range(copies)]
    cycle = itertools.cycle(callables)
    return lambda: next(cycle)()


def copies_needed(tensor_bytes: int, device: torch.device) -> int:
    """Enough input sets that their total exceeds twice the L2 cache."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return max(1, min(16, -(-2 * l2 // max(tensor_bytes, 1))))


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 512 * 2**20) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), measured now, the yardstick."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = gpu_time(lambda: dst.copy_(src))
    return 2 * nbytes / (timing.ms * 1e-3) / 1e9
