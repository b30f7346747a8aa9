"""The ops suite: batch-norm + ReLU, batch-norm + add + ReLU and add + ReLU in every mode, on ResNet-50's
batch-norm shapes, for each provider, interleaved case by case; ``--activation`` puts another activation in
ReLU's place (the rows then name it: batch_norm_silu, batch_norm_add_silu, add_silu)."""
from __future__ import annotations

from typing import Iterator

import torch

from .cases import (MODES, OPS, SITES, eager_op, floor_bytes, fused_op, is_frozen, make_inputs, mode_callable,
                    op_label, site_shape, unfrozen)
from .runner import (INTERPRETER_NOTE, Settings, dtype_name, fresh_compile, max_error, measure_cpu, measure_gpu,
                     rows_of_cases)



def op_shapes(op: str, batch_size: int, on_gpu: bool, quick: bool, sites: str = "resnet50") -> list[tuple[int, ...]]:
    """The sites of ``sites`` (ResNet-50's, r3d_18's) that this op serves (batch-norm + ReLU: the sites followed by
    a ReLU; the others: those followed by the add); on a CPU, the same sites scaled down for the interpreter."""
    wanted = "relu" if unfrozen(op) == "batch_norm_relu" else "add_relu"
    table, quick_table = SITES[sites]
    chosen = [(c, size) for c, size, follows, _ in (quick_table if quick else table) if follows == wanted]
    if not on_gpu:
        chosen = [(max(3, c // 32), _scaled(size)) for c, size in chosen][: 1 if quick else 3]
    return [site_shape(batch_size, c, size) for c, size in dict.fromkeys(chosen)]


def _scaled(size):
    return max(3, size // 8) if isinstance(size, int) else tuple(max(2, s // 8) for s in size)


def run_ops(settings: Settings, ops=OPS, modes=MODES) -> Iterator[dict]:
    """The rows of each case as soon as it is measured."""
    cases = [(op, shape, dtype, layout, mode) for op in ops for dtype in settings.dtypes
             for layout in settings.layouts for shape in op_shapes(op, settings.batch_size, settings.on_gpu,
                                                                   settings.quick, settings.sites)
             for mode in modes]

    def rows_of(case):
        op, shape, dtype, layout, mode = case
        base = dict(level="op", op=op_label(op, settings.activation), mode=mode, shape="x".join(map(str, shape)),
                    dtype=dtype_name(dtype), layout=layout,
                    floor_bytes=floor_bytes(op, mode, shape, dtype, settings.activation))
        spec = (op, mode, shape, dtype, layout == "channels_last")
        return base, lambda: (_gpu_rows if settings.on_gpu else _cpu_rows)(base, spec, settings)

    yield from rows_of_cases(cases, "ops", rows_of)


def _inputs(spec, device, seed=0):
    op, mode, shape, dtype, channels_last = spec
    return make_inputs(shape, dtype, channels_last, device, mode in ("backward", "forward_backward"), seed,
                       frozen=is_frozen(op))


def _gpu_rows(base, spec, settings: Settings) -> list[dict]:
    op, mode, shape, dtype, _ = spec
    training = mode != "inference"
    rows = []
    for provider in (p for p in settings.providers if p in ("eager", "compile", "fusedres")):
        if provider == "fusedres":
            fn = fused_op(op, training, settings.activation)
        else:
            fn = eager_op(op, training, settings.activation)
            fn = fresh_compile(fn) if provider == "compile" else fn
        make = lambda seed, fn=fn: mode_callable(fn, mode, _inputs(spec, settings.device, seed))  # noqa: E731
        input_bytes = torch.empty((), dtype=dtype).element_size() * torch.Size(shape).numel()
        rows.append(measure_gpu(dict(base, provider=provider), make, settings, compiled=provider == "compile",
                                input_bytes=input_bytes))
    return rows


def _cpu_rows(base, spec, settings: Settings) -> list[dict]:
    """Both providers against eager PyTorch on float64 copies of the same inputs; eager timed on the CPU,
    fusedres run once in the interpreter (its time is not speed, so it is not reported)."""
    op, mode, *_ = spec
    training = mode != "inference"
    cpu = settings.device
    eager = eager_op(op, training, settings.activation)
    reference = mode_callable(eager, mode, _inputs(spec, cpu).float64_copy())()
    rows = []
    if "eager" in settings.providers:
        error = max_error(mode_callable(eager, mode, _inputs(spec, cpu))(), reference)
        rows.append(measure_cpu(dict(base, provider="eager", max_abs_error=error),
                                mode_callable(eager, mode, _inputs(spec, cpu)), settings))
    if "fusedres" in settings.providers:
        error = max_error(mode_callable(fused_op(op, training, settings.activation), mode, _inputs(spec, cpu))(),
                          reference)
        rows.append(dict(base, provider="fusedres", max_abs_error=error, timer="interpreter (not timed)",
                         note=INTERPRETER_NOTE))
    return rows
