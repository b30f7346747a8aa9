"""The ops suite: batch-norm + ReLU, batch-norm + add + ReLU and add + ReLU in every mode, on ResNet-50's
batch-norm shapes, for each provider, interleaved case by case."""
from __future__ import annotations

import time

import torch

from .cases import RESNET50_SITES, eager_op, floor_bytes, fused_op, make_inputs, mode_callable
from .timing import copies_needed, cpu_time, gpu_time, rotating

QUICK_SITES = [(64, 56, "relu", 6), (256, 14, "relu", 11), (512, 28, "add_relu", 4), (2048, 7, "add_relu", 3)]


def op_shapes(op: str, batch_size: int, on_gpu: bool, quick: bool) -> list[tuple[int, int, int, int]]:
    """ResNet-50's sites that this op serves (batch-norm + ReLU: the sites followed by a ReLU; the others: those
    followed by the add); on a CPU, the same sites scaled down for the interpreter."""
    wanted = "relu" if op == "batch_norm_relu" else "add_relu"
    sites = [(c, hw) for c, hw, follows, _ in (QUICK_SITES if quick else RESNET50_SITES) if follows == wanted]
    if not on_gpu:
        sites = [(max(3, c // 32), max(3, hw // 8)) for c, hw in sites][: 1 if quick else 3]
    return [(batch_size, c, hw, hw) for c, hw in dict.fromkeys(sites)]


def _progress(total: int):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="fusedres-bench", unit="case")
    except ImportError:
        class Plain:
            def __init__(self):
                self.done = 0

            def update(self, n=1):
                self.done += n
                print(f"\rfusedres-bench: {self.done}/{total} cases", end="", flush=True)

            def close(self):
                print()
        return Plain()


def _build(provider: str, op: str, training: bool):
    if provider == "fusedres":
        return fused_op(op, training), None
    fn = eager_op(op, training)
    if provider == "eager":
        return fn, None
    torch._dynamo.reset()  # a fresh cache per case: the recompile limit must never turn compile into eager
    return torch.compile(fn, dynamic=False), "compile"


def run_ops(device: torch.device, *, dtypes, layouts, providers, ops, modes, batch_size: int, quick: bool,
            warmup_ms: float, rep_ms: float) -> list[dict]:
    on_gpu = device.type == "cuda"
    cases = [(op, shape, dtype, layout, mode) for op in ops for dtype in dtypes for layout in layouts
             for shape in op_shapes(op, batch_size, on_gpu, quick) for mode in modes]
    progress = _progress(len(cases))
    rows = []
    for op, shape, dtype, layout, mode in cases:
        base = dict(level="op", op=op, mode=mode, shape="x".join(map(str, shape)), dtype=str(dtype).split(".")[-1],
                    layout=layout, floor_bytes=floor_bytes(op, mode, shape, dtype))
        channels_last = layout == "channels_last"
        training = mode != "inference"
        requires_grad = mode in ("backward", "forward_backward")
        if on_gpu:
            rows += [_gpu_row(base, provider, op, mode, training, shape, dtype, channels_last, requires_grad,
                              device, warmup_ms, rep_ms) for provider in providers]
        else:
            rows += _cpu_rows(base, providers, op, mode, training, shape, dtype, channels_last, requires_grad,
                              quick)
        progress.update(1)
    progress.close()
    return rows


def _gpu_row(base, provider, op, mode, training, shape, dtype, channels_last, requires_grad, device, warmup_ms,
             rep_ms) -> dict:
    row = dict(base, provider=provider)
    try:
        fn, kind = _build(provider, op, training)
        make = lambda seed: mode_callable(fn, mode, make_inputs(shape, dtype, channels_last, device,  # noqa
                                                                requires_grad, seed))
        if kind == "compile":
            started = time.perf_counter()
            make(0)()
            torch.cuda.synchronize()
            row["compile_s"] = time.perf_counter() - started
        element_bytes = torch.empty((), dtype=dtype).element_size()
        tensor_bytes = element_bytes * shape[0] * shape[1] * shape[2] * shape[3]
        run = rotating(make, copies_needed(tensor_bytes, device))
        timing = gpu_time(run, warmup_ms=warmup_ms, rep_ms=rep_ms)
        row.update(ms=timing.ms, ms_p20=timing.ms_p20, ms_p80=timing.ms_p80, timer=timing.timer)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize()
        row["peak_mem_mb"] = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
    except Exception as error:  # one failing provider must not sink the sweep
        row["note"] = f"{provider} {op} {mode} failed: {type(error).__name__}: {str(error)[:160]}"
    return row


def _outputs(result):
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for t in result if t is not None]


def _max_error(result, reference) -> float:
    return max((float((a.double() - b).abs().nan_to_num(0.0).max()) if a.numel() else 0.0
                for a, b in zip(_outputs(result), _outputs(reference))), default=0.0)


def _cpu_rows(base, providers, op, mode, training, shape, dtype, channels_last, requires_grad, quick) -> list:
    """Both providers against eager PyTorch on float64 copies of the same inputs; eager timed on the CPU,
    fusedres run once in the interpreter (its time is not speed, so it is not reported)."""
    cpu = torch.device("cpu")
    inputs = lambda: make_inputs(shape, dtype, channels_last, cpu, requires_grad)  # noqa: E731 (same seed)
    reference = mode_callable(eager_op(op, training), mode, inputs().float64_copy())()
    rows = []
    if "eager" in providers:
        error = _max_error(mode_callable(eager_op(op, training), mode, inputs())(), reference)
        timing = cpu_time(mode_callable(eager_op(op, training), mode, inputs()),
                          min_run_time=0.05 if quick else 0.2)
        rows.append(dict(base, provider="eager", ms=timing.ms, ms_p20=timing.ms_p20, ms_p80=timing.ms_p80,
                         timer=timing.timer, max_abs_error=error))
    if "fusedres" in providers:
        error = _max_error(mode_callable(fused_op(op, training), mode, inputs())(), reference)
        rows.append(dict(base, provider="fusedres", max_abs_error=error, timer="interpreter (not timed)",
                         note="CPU run: fusedres ran in Triton's interpreter; its error against eager PyTorch on "
                              "float64 copies of the inputs is reported, not its time"))
    return rows
