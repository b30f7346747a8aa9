"""Compile every kernel variant the launchers produce, ahead of time, for NVIDIA GPU targets, without a GPU.

Triton's interpreter accepts code the GPU compiler rejects; this catches it. Run as a script in a process
where TRITON_INTERPRET is not set (tests/test_aot_compile.py does): the launchers are called on meta tensors
under ``recorded_launches()``, every launch they would make is specialised as Triton's JIT would
(``fusedres.report.compiled.specialise``, the kernel report's route; pointers without the 16-byte alignment
hint, the most general code) and compiled for each target.

    python -m tests.aot_compile [--targets 90,80,89] [--quick]
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("tests/aot_compile.py: run without TRITON_INTERPRET=1 (it compiles for the GPU)")

import torch  # noqa: E402
import triton  # noqa: E402

from fusedres.kernels import add_act as AK  # noqa: E402
from fusedres.kernels import batch_norm as BK  # noqa: E402
from fusedres.kernels import ACTIVATIONS, DERIVATIVE_FROM_OUTPUT, forced_int64, recorded_launches  # noqa: E402
from fusedres.report.compiled import Specialisation, compile_for, specialise  # noqa: E402
from fusedres.ops import memory_format  # noqa: E402
from fusedres.report.kernel_report import RANK_SHAPES, RESNET50_SITES, site_shape  # noqa: E402

META = torch.device("meta")

# ResNet-50's batch-norm shapes at batch 128 (they set the GPU tile choices), the other ranks' (r3d_18's 3-D sites,
# an MLP head's (N, C)), and odd small ones.
SHAPES = ([site_shape(128, c, size) for c, size, _, _ in RESNET50_SITES] + [shape for shape, _ in RANK_SHAPES]
          + [(5, 12, 17), (3, 37, 5, 7), (1, 3, 1, 1)])


def _tensor(shape, dtype, channels_last=False):
    return torch.empty(shape, dtype=dtype, device=META).to(memory_format=memory_format(len(shape), channels_last))


def record_variants(quick: bool) -> list:
    """Call every launcher across dtypes, layouts, optional operands, shapes and the 64-bit switch."""
    dtypes = [(torch.float16, torch.float16), (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
              (torch.bfloat16, torch.float32), (torch.float32, torch.float32), (torch.float64, torch.float64)]
    shapes = SHAPES[-3:] + SHAPES[1:2] if quick else SHAPES
    specs = {}
    with recorded_launches() as launches:
        for (dtype, param_dtype), shape, channels_last, int64 in itertools.product(
                dtypes, shapes, (False, True), (False, True)):
            if int64 and shape != SHAPES[-2]:
                continue  # the 64-bit switch changes offsets only; one shape per variant is enough
            context = forced_int64() if int64 else _nothing()
            with context:
                _call_launchers(shape, dtype, param_dtype, channels_last)
    for kernel, args, num_warps in launches:
        spec = specialise(kernel, args, num_warps, aligned=False)
        specs.setdefault(spec.key, spec)
    return _covering_subset(list(specs.values()))


_WALK = ("CHANNELS_LAST", "SLAB_INNER", "ALIGN", "INT64")


def _features(spec: Specialisation) -> set:
    """What a variant exercises in the compiler: each argument's type or switch value, the whole set of boolean
    switches, the walk (layout, slab or rows, alignment hints, 64-bit offsets) with the warps, the data types
    (the input's and the accumulator's) with the kind of walk, and each pointer's type with the accumulator's.
    Tile sizes and H*W values are not features of their own."""
    signature, constexprs, num_warps, name = spec.flat_signature, spec.constexpr_values, spec.num_warps, spec.name
    switches = tuple(sorted((k, v) for k, v in constexprs.items()
                            if (isinstance(v, bool) or v is None) and k not in _WALK))
    walk = (constexprs.get("CHANNELS_LAST"), bool(constexprs.get("SLAB_INNER")), constexprs.get("ALIGN", 1) > 1,
            constexprs.get("INT64"), num_warps)
    activation = next(v for v in signature.values() if v.startswith("*"))  # the first pointer: the input
    types = (activation, str(constexprs.get("ACC")))
    features = {(name, k, signature[k], str(constexprs.get(k))) for k in signature
                if not k.startswith(("BLOCK",) + _WALK)}
    features |= {(name, "switches", switches), (name, "walk", walk), (name, "types", walk[:2], types)}
    # every pointer's type with the accumulator's: a merge loop that mixes them fails to compile
    features |= {(name, "pointer-acc", k, signature[k], str(constexprs.get("ACC"))) for k in signature
                 if signature[k].startswith("*")}
    return features


def _covering_subset(specs: list) -> list:
    """A small set of variants that together exercise every feature of every recorded variant (greedy)."""
    features = [_features(spec) for spec in specs]
    uncovered = set().union(*features)
    chosen = []
    while uncovered:
        best = max(range(len(specs)), key=lambda i: len(features[i] & uncovered))
        chosen.append(specs[best])
        uncovered -= features[best]
    return chosen


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _call_launchers(shape, dtype, param_dtype, channels_last):
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    c = shape[1]
    x = _tensor(shape, dtype, channels_last)
    y = _tensor(shape, dtype, channels_last)
    vec = lambda dt=param_dtype: _tensor((c,), dt)  # noqa: E731
    sums = _tensor((2, c), stats)
    activation_tensor = lambda: _tensor(shape, dtype, channels_last)  # noqa: E731
    for residual, affine in itertools.product((None, activation_tensor()), (False, True)):
        w, b = (vec(), vec()) if affine else (None, None)
        BK.bn_act_apply(x, residual, vec(), vec(), w, b, 1e-5, y)
        for training in (True, False):
            BK.bn_act_backward_reduce(
                y, x, vec(stats), vec(stats), w, b, 1e-5, sums_out=sums, output=y if residual is not None else None,
                grad_z_out=activation_tensor() if residual is not None else None,
                grad_x_out=None if training else activation_tensor(),
                grad_weight_out=vec() if affine else None, grad_bias_out=vec() if affine else None,
                need_sums=training)
        BK.bn_backward_dx(y, x, vec(stats), vec(stats), w, b, 1e-5, sums, grad_is_dy=residual is None,
                          grad_x_out=activation_tensor())
    # Every activation once in each kernel: forward with a residual, the backward from the residual (from the
    # output for the ReLU family), the dx pass recomputing the derivative from x, and the flat kernels.
    r = activation_tensor()
    for activation in ACTIVATIONS:
        kwargs = dict(activation=activation, slope=0.01)
        BK.bn_act_apply(x, r, vec(), vec(), vec(), vec(), 1e-5, y, **kwargs)
        source = dict(output=y) if activation in DERIVATIVE_FROM_OUTPUT else dict(residual=r)
        BK.bn_act_backward_reduce(y, x, vec(stats), vec(stats), vec(), vec(), 1e-5, sums_out=sums,
                                  grad_z_out=activation_tensor(), **source, **kwargs)
        BK.bn_backward_dx(y, x, vec(stats), vec(stats), vec(), vec(), 1e-5, sums, grad_is_dy=True,
                          grad_x_out=activation_tensor(), **kwargs)
        flat = _tensor((math.prod(shape),), dtype)
        AK.add_act_forward(flat, _tensor(flat.shape, param_dtype), _tensor(flat.shape, param_dtype), **kwargs)
        second = None if activation in DERIVATIVE_FROM_OUTPUT else flat
        AK.act_backward(flat, flat, second, _tensor(flat.shape, dtype), **kwargs)
    # A residual of another dtype promotes the output (fp32 + fp64 computes in fp64).
    other = {torch.float32: torch.float64}.get(dtype, torch.float32)
    BK.bn_act_apply(x, _tensor(shape, other, channels_last), vec(), vec(), None, None, 1e-5,
                    _tensor(shape, torch.promote_types(dtype, other), channels_last))
    BK.bn_batch_stats(x, vec(stats), vec(stats))
    for num_batches_tracked in (None, _tensor((), torch.int64)):
        BK.bn_batch_stats(x, vec(stats), vec(stats), vec(), vec(), momentum=0.1,
                          num_batches_tracked=num_batches_tracked)
    # A synchronized batch-norm: fp64 rows for the exchange, then the merge of the ranks' rows.
    fp64 = lambda: _tensor((c,), torch.float64)  # noqa: E731
    BK.bn_batch_stats(x, fp64(), fp64())
    gathered = _tensor((3, 3, c), torch.float64)
    BK.bn_merge_ranks(gathered, vec(stats), vec(stats), fp64())
    for num_batches_tracked in (None, _tensor((), torch.int64)):
        BK.bn_merge_ranks(gathered, vec(stats), vec(stats), fp64(), vec(), vec(), momentum=0.1,
                          num_batches_tracked=num_batches_tracked)


def _compile(job: tuple[Specialisation, int]):
    spec, capability = job
    try:
        compile_for(spec, capability)
        return None
    except Exception as error:  # report every failure, not just the first
        return f"{spec.name} sm_{capability} {spec.constexpr_values}: {type(error).__name__}: {error}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="90,80,89", help="compute capabilities, comma-separated")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    options = parser.parse_args(argv)
    start = time.time()
    specs = record_variants(options.quick)
    capabilities = [int(t) for t in options.targets.split(",")]
    jobs = list(itertools.product(specs, capabilities))  # (a Specialisation travels by its kernel's name)
    with ProcessPoolExecutor(max_workers=options.jobs) as pool:
        failures = [f for f in pool.map(_compile, jobs, chunksize=4) if f]
    kernels = sorted({spec.name for spec in specs})
    print(f"aot_compile: {len(specs)} variants of {len(kernels)} kernels x {len(capabilities)} targets "
          f"(triton {triton.__version__}) in {time.time() - start:.0f} s: {len(failures)} failed")
    for failure in failures:
        print("FAILED", failure)
    return 1 if failures or not specs else 0


if __name__ == "__main__":
    sys.exit(main())
