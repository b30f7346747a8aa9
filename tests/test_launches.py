"""Launches per op, in the interpreter: the public functions launch what the kernel report records (so the
report's numbers describe what users run), two launches per training pass and one otherwise; the bytes they move
are at docs/design.md's floors; and the last-program merges give bitwise-identical results, whether one split or
many finish last."""
from __future__ import annotations

import pytest
import torch

import fusedres
import fusedres.functional as FF
from fusedres.report import kernel_report
from fusedres.kernels import recorded_launches
from fusedres.kernels.walk import overridden_constants
from tests.helpers import DEVICE, FULL, INTERPRETING, make_input, make_params

pytestmark = pytest.mark.skipif(not INTERPRETING, reason="counts launches and bytes in Triton's interpreter")

SHAPE = (3, 10, 7, 5)


def _public_call(op: str, mode: str, channels_last: bool):
    """Run ``op`` in ``mode`` through the public functions; return the launches of the measured part."""
    x = make_input(SHAPE, torch.bfloat16, channels_last)
    r = make_input(SHAPE, torch.bfloat16, channels_last)
    rm, rv, w, b = make_params(SHAPE[1], torch.float32)
    training = mode in ("train_forward", "train_backward", "recompute")
    backward = mode.endswith("backward")
    leaves = [t.requires_grad_() for t in (x, r, w, b)] if backward else []

    def forward():
        if op == "add_relu":
            return FF.add_relu(x, r)
        if op == "batch_norm_relu":
            return FF.batch_norm_relu(x, rm, rv, w, b, training)
        return FF.batch_norm_add_relu(x, r, rm, rv, w, b, training)

    if mode == "recompute":  # save_memory: a consumer saved the output; its backward has it recomputed
        w.requires_grad_()
        with fusedres.saving_memory():
            y = forward()
            consumer = torch.ones_like(y, dtype=torch.float32, requires_grad=True)
            z = y * consumer  # saves y for the consumer's gradient
        with recorded_launches(run=True) as launches:
            torch.autograd.grad(z, [consumer], torch.ones_like(z))
        return launches
    if not backward:
        with torch.no_grad(), recorded_launches(run=True) as launches:
            forward()
        return launches
    y = forward()
    used = {"add_relu": [x, r], "batch_norm_relu": [x, w, b], "batch_norm_add_relu": leaves}[op]
    with recorded_launches(run=True) as launches:
        torch.autograd.grad(y, used, make_input(SHAPE, y.dtype, channels_last, shift=0.0))
    return launches


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("op,mode", kernel_report.OP_MODES, ids=lambda v: str(v))
def test_public_functions_launch_what_the_report_records(op, mode, channels_last):
    public = [kernel.fn.__name__ for kernel, _, _ in _public_call(op, mode, channels_last)]
    reported = [kernel.fn.__name__ for kernel, _, _ in kernel_report.record(op, mode, SHAPE, torch.bfloat16,
                                                                             channels_last)]
    assert public == reported
    assert len(public) == kernel_report.EXPECTED_LAUNCHES[mode], f"{op} {mode}: {public}"


@pytest.mark.parametrize("shape", [(2, 16, 16, 16), (2, 16, 4, 8, 8), (512, 64)], ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("op,mode", kernel_report.OP_MODES, ids=lambda v: str(v))
def test_bytes_moved_are_at_the_floor(op, mode, channels_last, shape):
    # Per-channel vectors and partial rows add a little on shapes this small; activations must add nothing. Every
    # rank is the same walk (the spatial dims flattened; (N, C): rows of samples), at the same floors.
    moved = kernel_report.element_bytes(kernel_report.count_bytes(op, mode, shape, torch.bfloat16, channels_last),
                                        shape, torch.bfloat16)
    floor = kernel_report.FLOOR_ELEMENT_BYTES[(op, mode)]
    assert floor <= moved < floor + 0.15, f"{op} {mode}: {moved:.3f} element sizes moved, floor {floor}"


def _training_step(x, r, w, b, g):
    rm, rv = torch.zeros(x.shape[1], device=DEVICE), torch.ones(x.shape[1], device=DEVICE)
    y = FF.batch_norm_add_relu(x, r, rm, rv, w, b, True)
    return (y, rm, rv, *torch.autograd.grad(y, (x, r, w, b), g))


@pytest.mark.parametrize("channels_last", [False, pytest.param(True, marks=FULL)])  # (--full: 5 s each)
def test_last_program_merges_are_bitwise_deterministic(channels_last):
    """The same step with one split per channel block and with many: the merge order is fixed, so repeating a
    step gives the same bits; many splits are checked against one for closeness (a different order)."""
    x = make_input((4, 12, 9, 7), torch.float32, channels_last).requires_grad_()
    r = make_input(x.shape, torch.float32, channels_last).requires_grad_()
    _, _, w, b = make_params(12, torch.float32)
    w.requires_grad_()
    b.requires_grad_()
    g = make_input(x.shape, torch.float32, channels_last, shift=0.0)
    results = {}
    for name, constants in (("one split", dict(target_programs=1, max_splits=1)),
                            ("many splits", dict(target_programs=4096, max_splits=4096, tile_elements=64))):
        with overridden_constants(**constants):
            first = _training_step(x, r, w, b, g)
            again = _training_step(x, r, w, b, g)
        for a, e in zip(first, again):
            assert torch.equal(a, e), f"{name}: a repeated step differs"
        results[name] = first
    for a, e in zip(results["one split"], results["many splits"]):
        torch.testing.assert_close(a, e, rtol=2e-5, atol=2e-5)
