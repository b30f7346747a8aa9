"""What each fused op launches, moves and compiles to, without a GPU: the model behind the ``kernels`` suite of
``fusedres-bench`` and the limits ``tests/test_kernel_report.py`` holds the kernels to (docs/design.md, "The
kernel report").

- ``record``: the launches of one op in one mode, recorded on meta tensors through the op layer's kernel
  functions, in the order the op layer and autograd call them (tests/test_launches.py checks that order against
  the public API). Every number below is computed from these launches.
- ``count_bytes``: the bytes the launches move, counted in Triton's interpreter on real tensors: per launch, the
  distinct bytes its programs read and write (a cache within a launch, none across launches: DRAM traffic when
  the activations do not fit in L2).
- ``analyse_launches``: what the sm_90 compiler makes of each launch specialised as the JIT would
  (``fusedres.report.compiled``): registers, local memory, occupancy, and the width of the accesses in the
  kernels' loops, which are the activation accesses.

All of it is a prediction from a model, never a measurement of a GPU; the rows say so.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from .. import ops
from ..kernels import ACTIVATIONS, DERIVATIVE_FROM_OUTPUT, INTERPRETING, recorded_launches

EPS = 1e-5
# "recompute": what save_memory adds to a site without a residual (fusedres.memory): its output recomputed in the
# backward, one launch of the normalize kernel with the batch statistics.
MODES = {"batch_norm_relu": ("inference", "train_forward", "train_backward", "eval_backward", "recompute"),
         "batch_norm_add_relu": ("inference", "train_forward", "train_backward", "eval_backward"),
         "add_relu": ("forward", "backward")}
OP_MODES = [(op, mode) for op, modes in MODES.items() for mode in modes]

# Per element, in element sizes (docs/design.md): what the fused design must move, and what eager PyTorch moves.
FLOOR_ELEMENT_BYTES = {
    ("batch_norm_relu", "inference"): 2, ("batch_norm_relu", "train_forward"): 3,
    ("batch_norm_relu", "train_backward"): 5, ("batch_norm_relu", "eval_backward"): 3,
    ("batch_norm_relu", "recompute"): 2,
    ("batch_norm_add_relu", "inference"): 3, ("batch_norm_add_relu", "train_forward"): 4,
    ("batch_norm_add_relu", "train_backward"): 7, ("batch_norm_add_relu", "eval_backward"): 5,
    ("add_relu", "forward"): 3, ("add_relu", "backward"): 3,
}
EAGER_ELEMENT_BYTES = {
    ("batch_norm_relu", "inference"): 4, ("batch_norm_relu", "train_forward"): 5,
    ("batch_norm_relu", "train_backward"): 8, ("batch_norm_relu", "eval_backward"): 6,
    ("batch_norm_relu", "recompute"): 0,  # eager keeps the output instead
    ("batch_norm_add_relu", "inference"): 7, ("batch_norm_add_relu", "train_forward"): 8,
    ("batch_norm_add_relu", "train_backward"): 8, ("batch_norm_add_relu", "eval_backward"): 6,
    ("add_relu", "forward"): 5, ("add_relu", "backward"): 3,
}
# What the kernels are held to (issue: two launches per training pass, one otherwise).
EXPECTED_LAUNCHES = {"inference": 1, "train_forward": 2, "train_backward": 2, "eval_backward": 1, "forward": 1,
                     "backward": 1, "recompute": 1}


def floor_element_bytes(op: str, mode: str, activation: str = "relu") -> int:
    """The floor of ``op`` (named by its ReLU pattern) in ``mode`` with ``activation``: as ReLU's, except where
    the derivative needs the residual rather than the output (add + activation's backward reads both summands),
    and the identity, whose residual gradient is dy itself (nothing more is read or written)."""
    if activation == "identity" and op == "batch_norm_add_relu" and mode in ("train_backward", "eval_backward"):
        return {"train_backward": 5, "eval_backward": 3}[mode]
    if op == "add_relu" and mode == "backward":
        return 0 if activation == "identity" else 3 if activation in DERIVATIVE_FROM_OUTPUT else 4
    return FLOOR_ELEMENT_BYTES[(op, mode)]


def expected_launches(op: str, mode: str, activation: str = "relu") -> int:
    """Launches per op and mode: the identity's add backward launches nothing (its gradient is dy)."""
    return 0 if (op, mode, activation) == ("add_relu", "backward", "identity") else EXPECTED_LAUNCHES[mode]
# Spec-sheet peak DRAM bandwidths (GB/s), the roofline's denominators: vendor figures, not measurements.
PEAK_BANDWIDTH_GBPS = {"H100 SXM": 3350.0, "H200": 4800.0}
# The limits of the kernel report (docs/design.md): registers at 8 warps (two programs per SM), no local memory,
# and the narrowest activation access, in bits, by element size.
MAX_REGISTERS_AT_8_WARPS = 128
MIN_ACTIVATION_ACCESS_BITS = {2: 64, 4: 128, 8: 128}


@dataclass
class OpTensors:
    """The tensors one op call takes (``residual`` doubles as add_relu's second summand)."""

    x: torch.Tensor
    residual: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    grad: torch.Tensor


def make_tensors(shape, dtype: torch.dtype, channels_last: bool, device) -> OpTensors:
    """Random activations (uninitialised on meta) and per-channel tensors in fp32 for half inputs, as autocast
    gives; running variances positive."""
    fmt = ops.memory_format(len(shape), channels_last)
    params = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    activation = lambda: torch.randn(shape, device=device).to(dtype=dtype, memory_format=fmt)  # noqa: E731
    vector = lambda: torch.rand(shape[1], device=device, dtype=params) + 0.5  # noqa: E731
    return OpTensors(activation(), activation(), vector(), vector(), vector(), vector(), activation())


def _pre_activation(op: str, activation: str, t: OpTensors, state: dict) -> dict:
    """What the backward reads beyond the input, as ops' autograd saves it: the output (ReLU family), the
    residual (other activations), or nothing (no residual, or the identity)."""
    source = ops.pre_activation_source(activation, op != "batch_norm_relu")
    return dict(residual=t.residual if source == "residual" else None, output=state["y"] if source == "output"
                else None)


def _forward_state(op: str, mode: str, t: OpTensors, activation: str) -> dict:
    """What a backward (or save_memory's recomputation) needs from its forward (the saved output and the statistics
    the forward used)."""
    if op == "add_relu":
        return dict(y=ops.run_add_act(t.x, t.residual, activation, 0.01))
    residual = t.residual if op == "batch_norm_add_relu" else None
    training = mode in ("train_backward", "recompute")
    if training:
        mean, var = ops.run_batch_norm_stats(t.x, None, None, 0.1, None)
    else:
        mean, var = t.running_mean, t.running_var
    y = ops.run_batch_norm_act(t.x, residual, t.weight, t.bias, mean, var, training, EPS, activation, 0.01)
    return dict(y=y, mean=mean, var=var)


def _launch_op(op: str, mode: str, t: OpTensors, state: dict | None, activation: str) -> None:
    """Call the op layer's registered ops' functions for ``op`` in ``mode`` as ``fusedres.ops``'
    ``dispatch_batch_norm_act`` / ``dispatch_add_act`` and their autograd call them (every gradient asked for)."""
    if op == "add_relu":
        if mode == "forward":
            ops.run_add_act(t.x, t.residual, activation, 0.01)
        elif activation != "identity":  # the identity's gradient is grad_output itself: nothing launches
            pre = _pre_activation(op, activation, t, state)
            first, second = (state["y"], None) if pre["output"] is not None else (t.x, t.residual)
            ops.run_act_backward(t.grad, first, second, activation, 0.01)
        return
    residual = t.residual if op == "batch_norm_add_relu" else None
    if mode == "inference":
        ops.run_batch_norm_act(t.x, residual, t.weight, t.bias, t.running_mean, t.running_var, False, EPS,
                                   activation, 0.01)
    elif mode == "train_forward":
        mean, var = ops.run_batch_norm_stats(t.x, t.running_mean, t.running_var, 0.1, None)
        ops.run_batch_norm_act(t.x, residual, t.weight, t.bias, mean, var, True, EPS, activation, 0.01)
    elif mode == "recompute":  # (fusedres.memory.Recompute's launch)
        ops.run_batch_norm_act(t.x, None, t.weight, t.bias, state["mean"], state["var"], True, EPS, activation, 0.01)
    else:
        pre = _pre_activation(op, activation, t, state)
        ops.run_batch_norm_act_backward(t.grad, t.x, pre["residual"], pre["output"], t.weight, t.bias,
                                            state["mean"], state["var"], mode == "train_backward", EPS, activation,
                                            0.01, [True, residual is not None and activation != "identity", True,
                                                   True])


def _needs_forward(mode: str) -> bool:
    """Whether the mode's launches need their forward's state (saved output, batch statistics)."""
    return mode.endswith("backward") or mode == "recompute"


def _check_op_mode(op: str, mode: str) -> None:
    if mode not in MODES.get(op, ()):
        raise ValueError(f"fusedres.report.kernel_report: unknown op/mode {op!r}/{mode!r}; known: {OP_MODES}")


def record(op: str, mode: str, shape, dtype: torch.dtype, channels_last: bool, activation: str = "relu") -> list:
    """The launches ``(kernel, arguments, num_warps)`` of ``op`` in ``mode`` on a tensor of ``shape``, recorded on
    meta tensors (nothing runs, nothing is allocated)."""
    _check_op_mode(op, mode)
    t = make_tensors(shape, dtype, channels_last, "meta")
    with recorded_launches():
        state = _forward_state(op, mode, t, activation) if _needs_forward(mode) else None
    with recorded_launches() as launches:
        _launch_op(op, mode, t, state, activation)
    return launches


@dataclass(frozen=True)
class LaunchBytes:
    kernel: str
    read: int     # distinct bytes read by the launch's programs
    written: int  # distinct bytes written


@contextlib.contextmanager
def _interpreted_accesses(launches: list):
    """Every global load and store the interpreter performs, as ``(launch, is_load, element addresses, element
    bytes)``. ``launches`` is a running recorder's list: it gains a launch before the launch runs, so an access
    made while it holds k launches belongs to launch k - 1."""
    from triton.runtime.interpreter import InterpreterBuilder

    accesses: list = []
    names = ("create_load", "create_store", "create_masked_load", "create_masked_store")
    originals = {name: getattr(InterpreterBuilder, name) for name in names}

    def note(is_load, ptrs, mask):
        addresses = np.asarray(ptrs.data).reshape(-1)
        if mask is not None:
            addresses = addresses[np.broadcast_to(np.asarray(mask.data), np.shape(ptrs.data)).reshape(-1)]
        accesses.append((len(launches) - 1, is_load, addresses.astype(np.uint64),
                         ptrs.get_element_ty().primitive_bitwidth // 8))

    def create_load(self, ptr, *args):
        note(True, ptr, None)
        return originals["create_load"](self, ptr, *args)

    def create_store(self, ptr, value, *args):
        note(False, ptr, None)
        return originals["create_store"](self, ptr, value, *args)

    def create_masked_load(self, ptrs, mask, *args):
        note(True, ptrs, mask)
        return originals["create_masked_load"](self, ptrs, mask, *args)

    def create_masked_store(self, ptrs, value, mask, *args):
        note(False, ptrs, mask)
        return originals["create_masked_store"](self, ptrs, value, mask, *args)

    replacements = dict(create_load=create_load, create_store=create_store, create_masked_load=create_masked_load,
                        create_masked_store=create_masked_store)
    for name in names:
        setattr(InterpreterBuilder, name, replacements[name])
    try:
        yield accesses
    finally:
        for name, function in originals.items():
            setattr(InterpreterBuilder, name, function)


def _distinct_bytes(accesses: list) -> int:
    byte_addresses = [(addresses[:, None] + np.arange(size, dtype=np.uint64)).reshape(-1)
                      for addresses, size in accesses]
    return int(np.unique(np.concatenate(byte_addresses)).size) if byte_addresses else 0


def count_bytes(op: str, mode: str, shape, dtype: torch.dtype, channels_last: bool, seed: int = 0,
                activation: str = "relu") -> list[LaunchBytes]:
    """The distinct bytes each launch of ``op`` in ``mode`` reads and writes, counted in Triton's interpreter on
    CPU tensors of ``shape`` (keep it small: the interpreter runs about a millisecond per program)."""
    if not INTERPRETING:
        raise RuntimeError("fusedres.report.kernel_report.count_bytes: counts in Triton's interpreter; run it in a "
                           "process started with TRITON_INTERPRET=1")
    _check_op_mode(op, mode)
    torch.manual_seed(seed)
    t = make_tensors(shape, dtype, channels_last, "cpu")
    state = _forward_state(op, mode, t, activation) if _needs_forward(mode) else None
    with recorded_launches(run=True) as launches, _interpreted_accesses(launches) as accesses:
        _launch_op(op, mode, t, state, activation)
    return [LaunchBytes(kernel.fn.__name__,
                        _distinct_bytes([(a, size) for k, load, a, size in accesses if k == index and load]),
                        _distinct_bytes([(a, size) for k, load, a, size in accesses if k == index and not load]))
            for index, (kernel, _, _) in enumerate(launches)]


def element_bytes(launch_bytes: list[LaunchBytes], shape, dtype: torch.dtype) -> float:
    """Bytes moved per activation element, in element sizes (comparable with FLOOR_ELEMENT_BYTES)."""
    numel = int(np.prod(shape))
    return sum(b.read + b.written for b in launch_bytes) / (numel * torch.empty((), dtype=dtype).element_size())


# ----------------------------------------------------------------------------------------------------------
# What the compiler makes of the launches (a process without TRITON_INTERPRET).
# ----------------------------------------------------------------------------------------------------------

def site_shape(batch: int, channels: int, size) -> tuple[int, ...]:
    """A site's input shape: ``size`` is the height = width of a 2-D site, or the spatial sizes (a tuple)."""
    return (batch, channels, size, size) if isinstance(size, int) else (batch, channels, *size)


# ResNet-50's batch-norm sites (docs/design.md): (channels, height = width, what follows the batch-norm, how many
# times); the report takes them at batch 128, the benchmark at its batch size.
RESNET50_SITES = [
    (64, 112, "relu", 1), (64, 56, "relu", 6), (128, 56, "relu", 1), (256, 56, "add_relu", 3),
    (128, 28, "relu", 7), (256, 28, "relu", 1), (512, 28, "add_relu", 4), (256, 14, "relu", 11),
    (512, 14, "relu", 1), (1024, 14, "add_relu", 6), (512, 7, "relu", 5), (2048, 7, "add_relu", 3),
]
# --quick (the report's and the benchmark's): 56x56, 28x28 (add), 14x14, 7x7 (add).
QUICK_SITES = [RESNET50_SITES[i] for i in (1, 6, 7, 11)]
# torchvision's video ResNet r3d_18 on 16-frame 112x112 clips: BatchNorm3d sites, (channels, (depth, height,
# width), what follows, how many times); its three shortcut projections' batch-norms are not sites.
R3D18_SITES = [
    (64, (16, 56, 56), "relu", 3), (64, (16, 56, 56), "add_relu", 2), (128, (8, 28, 28), "relu", 2),
    (128, (8, 28, 28), "add_relu", 2), (256, (4, 14, 14), "relu", 2), (256, (4, 14, 14), "add_relu", 2),
    (512, (2, 7, 7), "relu", 2), (512, (2, 7, 7), "add_relu", 2),
]
BATCH = 128
# The report's other ranks, as (shape, what follows): two of r3d_18's sites at batch 128 (channels_last_3d or
# NCDHW), and a BatchNorm1d on (N, C) = (16384, 512) feature vectors (a batch of one chunk would have no loop, and the
# report could not tell its activation accesses from its per-channel ones).
RANK_SHAPES = [(site_shape(BATCH, c, size), follows) for c, size, follows, _ in (R3D18_SITES[1], R3D18_SITES[4])] \
    + [((16384, 512), "relu")]


# The configurations the report covers: docs/design.md's primary (bf16 channels_last) and the NCHW ones whose
# small spatial sizes need the slab walk.
CONFIGURATIONS = [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, False)]


def site_cases(sites=RESNET50_SITES, configurations=CONFIGURATIONS, batch: int = BATCH) -> list[dict]:
    """One case per (op, mode, site, configuration): a site followed by a ReLU serves batch_norm_relu, one
    followed by the residual add serves batch_norm_add_relu and add_relu."""
    return shape_cases([(site_shape(batch, channels, size), follows) for channels, size, follows, _ in sites],
                       configurations)


def shape_cases(shapes, configurations=CONFIGURATIONS) -> list[dict]:
    """``site_cases`` for ``(shape, what follows)`` pairs."""
    cases = []
    for shape, follows in shapes:
        ops_here = ("batch_norm_relu",) if follows == "relu" else ("batch_norm_add_relu", "add_relu")
        for dtype, channels_last in configurations:
            for op in ops_here:
                for mode in MODES[op]:
                    cases.append(dict(op=op, mode=mode, shape=tuple(shape), dtype=dtype, channels_last=channels_last,
                                      activation="relu"))
    return cases


def activation_cases(site=(256, 14), configurations=CONFIGURATIONS[:2], batch: int = BATCH) -> list[dict]:
    """Every other activation on one site, with the residual add (its backward reads the residual, or the output
    for relu6; the identity's reads neither) and as add + activation, in the configurations given (14x14: the
    NCHW one takes the slab walk)."""
    channels, size = site
    return [dict(op=op, mode=mode, shape=(batch, channels, size, size), dtype=dtype, channels_last=channels_last,
                 activation=activation)
            for activation in ACTIVATIONS if activation != "relu" for dtype, channels_last in configurations
            for op in ("batch_norm_add_relu", "add_relu") for mode in MODES[op]]


def analyse_cases(cases: list[dict], *, capability: int = 90, jobs: int = 2) -> list[dict]:
    """Per case: its launches and what the compiler made of them, as one row (see ``kernel_limits``)."""
    from .compiled import analyse_all, specialise

    recorded = [record(c["op"], c["mode"], c["shape"], c["dtype"], c["channels_last"], c.get("activation", "relu"))
                for c in cases]
    specs = [specialise(kernel, args, warps) for launches in recorded for kernel, args, warps in launches]
    analyses = iter(analyse_all(specs, capability=capability, jobs=jobs))
    rows = []
    for case, launches in zip(cases, recorded):
        found = [next(analyses) for _ in launches]
        # The streaming accesses: those in a kernel's loops (its per-channel vectors are read before them), or
        # every access of a kernel without loops (the flat add + ReLU kernels, one tile per program).
        loop_loads = [bits for a in found for bits in (a.loop_load_widths if a.loop_load_widths or a.loop_store_widths
                                                       else a.load_widths)]
        loop_stores = [bits for a in found for bits in (a.loop_store_widths if a.loop_load_widths
                                                        or a.loop_store_widths else a.store_widths)]
        activation = case.get("activation", "relu")
        rows.append(dict(
            op=case["op"], mode=case["mode"], activation=activation, shape="x".join(map(str, case["shape"])),
            dtype=str(case["dtype"]).split(".")[-1], layout="channels_last" if case["channels_last"] else "nchw",
            element_size=torch.empty((), dtype=case["dtype"]).element_size(),
            launches=len(launches), expected_launches=expected_launches(case["op"], case["mode"], activation),
            kernels="+".join(a.name.strip("_").removesuffix("_kernel") for a in found),
            num_warps=max((a.num_warps for a in found), default=None),
            registers=max((a.registers for a in found), default=0),
            register_warps=max((a.registers * a.num_warps for a in found), default=0),
            local_bytes=max((a.local_memory_bytes for a in found), default=0),
            occupancy=min((a.occupancy.fraction for a in found), default=None),
            load_bits=min(loop_loads, default=None), store_bits=min(loop_stores, default=None),
            float_atomics=sum(n for a in found for opcode, n in a.atomics.items() if ".F" in opcode),
            # a merge's loads of other programs' partial rows must not be served from this SM's L1
            merge_l1_loads=sum(n for a in found for opcode, n in a.merge_loads.items() if ".STRONG.GPU" not in opcode
                               and ".STRONG.SYS" not in opcode),
            # a kernel taking tickets whose merge loop was not found: the check above would pass unchecked
            merges_unread=[a.name for a in found if a.atomics and not a.merge_loads],
            floor_element_bytes=floor_element_bytes(case["op"], case["mode"], activation),
            eager_element_bytes=EAGER_ELEMENT_BYTES[(case["op"], case["mode"])],
            capability=capability, source="prediction (compiled for sm_%d without a GPU)" % capability))
    return rows


def kernel_limits(row: dict) -> list[str]:
    """What a row breaks of the kernel report's limits (docs/design.md): launches per op, no local memory, at most
    128 registers at 8 warps (or as many register-warps at another warp count), activation accesses at least 64
    bits wide on 16-bit types (128 on wider ones), no float atomics, merges reading partial rows past L1."""
    problems = []
    where = (f"{row['op']} {row['mode']} {row['activation']} {row['shape']} {row['dtype']} {row['layout']} "
             f"({row['kernels']})")
    if row["launches"] != row["expected_launches"]:
        problems.append(f"{where}: {row['launches']} launches, expected {row['expected_launches']}")
    if row["local_bytes"]:
        problems.append(f"{where}: {row['local_bytes']} bytes of local memory per thread")
    if row["register_warps"] > MAX_REGISTERS_AT_8_WARPS * 8:
        problems.append(f"{where}: {row['registers']} registers at {row['num_warps']} warps, more than "
                        f"{MAX_REGISTERS_AT_8_WARPS} at 8 warps")
    narrowest = MIN_ACTIVATION_ACCESS_BITS[row["element_size"]]
    for kind in ("load_bits", "store_bits"):
        if row[kind] is not None and row[kind] < narrowest:
            problems.append(f"{where}: {row[kind]}-bit activation {kind.split('_')[0]}s, expected at least {narrowest}")
    if row["float_atomics"]:
        problems.append(f"{where}: {row['float_atomics']} float atomics")
    if row["merges_unread"]:
        problems.append(f"{where}: no merge loop found after the ticket in {', '.join(row['merges_unread'])} (the "
                        f"report cannot check its loads)")
    if row["merge_l1_loads"]:
        problems.append(f"{where}: {row['merge_l1_loads']} loads of partial rows in a merge may hit L1 (expected "
                        f".cg: LDG.*.STRONG.GPU)")
    return problems


def format_table(rows: list[dict]) -> str:
    header = ("op", "mode", "activation", "shape", "dtype", "layout", "launches", "kernels", "warps", "regs",
              "occupancy", "local B", "load bits", "store bits")
    lines = [" | ".join(header)]
    for r in rows:
        occupancy = "-" if r["occupancy"] is None else f"{r['occupancy']:.0%}"
        lines.append(" | ".join(str(v) for v in (
            r["op"], r["mode"], r["activation"], r["shape"], r["dtype"], r["layout"], r["launches"], r["kernels"],
            r["num_warps"], r["registers"], occupancy, r["local_bytes"], r["load_bits"], r["store_bits"])))
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m fusedres.report.kernel_report [--quick] [--json PATH]``: the compiled half of the report on
    ResNet-50's sites; exits 1 if a kernel breaks a limit. Run without TRITON_INTERPRET."""
    import argparse
    import json
    import sys
    import time

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the four QUICK_SITES")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", type=str, default=None, help="write the rows here")
    options = parser.parse_args(argv)
    if INTERPRETING:
        sys.exit("fusedres.report.kernel_report: compiles for the GPU; run it without TRITON_INTERPRET=1")
    sites = QUICK_SITES if options.quick else RESNET50_SITES
    started = time.time()
    rows = analyse_cases(site_cases(sites) + activation_cases() + shape_cases(RANK_SHAPES, CONFIGURATIONS[:2]),
                         jobs=options.jobs)
    print(format_table(rows))
    problems = [p for row in rows for p in kernel_limits(row)]
    for problem in problems:
        print("LIMIT", problem)
    print(f"kernel_report: {len(rows)} op cases in {time.time() - started:.0f} s: {len(problems)} over a limit")
    if options.json:
        with open(options.json, "w") as f:
            json.dump([{k: v for k, v in row.items()} for row in rows], f, indent=1)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
