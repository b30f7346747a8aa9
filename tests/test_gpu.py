"""GPU-only checks: ResNet-sized shapes, bitwise determinism, the last-program merges under real concurrency
(many programs, two streams, counters back at zero), no host synchronisation, CUDA-graph capture and the device
guard. Skipped without a CUDA GPU (the interpreter runs programs one after another and shows none of these)."""
from __future__ import annotations

import pytest
import torch

import fusedres
import fusedres.functional as FF
from tests.helpers import INTERPRETING, assert_close, fp64_copy, make_input, make_params, reference_batch_norm_act

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(INTERPRETING or not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPES = [(32, 64, 56, 56), (32, 256, 14, 14), (32, 2048, 7, 7), (8, 64, 112, 112), (5, 37, 13, 11)]


def _training_step(x, r, rm, rv, w, b, grad):
    y = FF.batch_norm_add_relu(x, r, rm, rv, w, b, training=True) if r is not None else \
        FF.batch_norm_relu(x, rm, rv, w, b, training=True)
    leaves = [t for t in (x, r, w, b) if t is not None]
    return (y, *torch.autograd.grad(y, leaves, grad))


def _inputs(shape, dtype, channels_last, residual):
    x = make_input(shape, dtype, channels_last).requires_grad_()
    r = make_input(shape, dtype, channels_last).requires_grad_() if residual else None
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    rm, rv, w, b = make_params(shape[1], param_dtype)
    return x, r, rm, rv, w.requires_grad_(), b.requires_grad_()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype,channels_last", [(torch.bfloat16, True), (torch.float32, False),
                                                 (torch.float16, True), (torch.float32, True)])
@pytest.mark.parametrize("residual", [False, True])
def test_large_shapes_match_eager(shape, dtype, channels_last, residual):
    x, r, rm, rv, w, b = _inputs(shape, dtype, channels_last, residual)
    ref_rm, ref_rv = fp64_copy(rm), fp64_copy(rv)
    leaves64 = [fp64_copy(t, True) for t in (x, r, w, b) if t is not None]
    grad = make_input(shape, dtype, channels_last, scale=1.0, shift=0.0)
    y, *grads = _training_step(x, r, rm, rv, w, b, grad)
    x64, *rest = leaves64
    r64 = rest.pop(0) if residual else None
    y64 = reference_batch_norm_act(x64, r64, ref_rm, ref_rv, *rest, True)
    assert_close(y, y64, "output")
    # Among millions of elements a few pre-activations lie within rounding of 0, where fp32 and fp64 may pick
    # different sides of the ReLU; the gradient reference takes the forward's side (the output is checked above).
    pre64 = torch.nn.functional.batch_norm(x64, None, None, rest[0], rest[1], True)
    pre64 = pre64 if r64 is None else pre64 + r64
    y64 = torch.where(y.detach() > 0, pre64, torch.zeros_like(pre64))
    ref_grads = torch.autograd.grad(y64, leaves64, grad.double())
    assert_close(rm, ref_rm, "running_mean")
    assert_close(rv, ref_rv, "running_var")
    for i, (g, ref) in enumerate(zip(grads, ref_grads)):
        assert_close(g, ref, f"grad {i}")
    with torch.no_grad():
        y = FF.batch_norm_add_relu(x, r, rm, rv, w, b) if residual else FF.batch_norm_relu(x, rm, rv, w, b)
        y64 = reference_batch_norm_act(x64.detach(), r64, fp64_copy(rm), fp64_copy(rv), *rest, False)
    assert_close(y, y64, "inference output")


@pytest.mark.parametrize("channels_last", [False, True])
def test_bitwise_deterministic(channels_last):
    x, r, rm, rv, w, b = _inputs((32, 256, 28, 28), torch.bfloat16, channels_last, True)
    grad = make_input(x.shape, x.dtype, channels_last, shift=0.0)
    first = _training_step(x, r, rm.clone(), rv.clone(), w, b, grad)
    for _ in range(3):
        again = _training_step(x, r, rm.clone(), rv.clone(), w, b, grad)
        for a, b_ in zip(first, again):
            assert torch.equal(a, b_), "results differ between identical calls"


@pytest.mark.parametrize("channels_last", [False, True])
def test_last_program_merges_see_every_partial_row(channels_last):
    """Many splits finishing at nearly the same time: if the program that takes the last ticket could read a
    partial row before its writer's stores were visible, some call would differ from the others or from eager.
    Tiny tiles and a large target give thousands of programs per channel block."""
    from fusedres.kernels import batch_norm as BK
    from fusedres.kernels._launch import _tickets

    x = make_input((64, 24, 28, 28), torch.float32, channels_last)
    tiles = dict(block_rows=16, block_channels=8, target_programs=1 << 16)
    mean, var = torch.empty(24, device=x.device), torch.empty(24, device=x.device)
    BK.bn_batch_stats(x, mean, var, **tiles)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    assert_close(mean, ref_mean, "mean")
    assert_close(var, ref_var, "var")
    for _ in range(200):
        again_mean, again_var = torch.empty_like(mean), torch.empty_like(var)
        BK.bn_batch_stats(x, again_mean, again_var, **tiles)
        assert torch.equal(again_mean, mean) and torch.equal(again_var, var)
    torch.cuda.synchronize()
    assert all(int(counters.abs().sum()) == 0 for counters in _tickets.values()), "ticket counters not reset"


def test_two_streams_at_once_match_one_stream():
    shapes = [(16, 64, 56, 56), (16, 512, 7, 7)]
    inputs = [_inputs(shape, torch.bfloat16, True, True) for shape in shapes]
    grads = [make_input(shape, torch.bfloat16, True, shift=0.0) for shape in shapes]
    expected = [_training_step(x, r, rm.clone(), rv.clone(), w, b, g) for (x, r, rm, rv, w, b), g in
                zip(inputs, grads)]
    streams = [torch.cuda.Stream() for _ in shapes]
    torch.cuda.synchronize()
    results = [[] for _ in shapes]
    for _ in range(20):
        for stream, (x, r, rm, rv, w, b), g, out in zip(streams, inputs, grads, results):
            with torch.cuda.stream(stream):
                out.append(_training_step(x, r, rm.clone(), rv.clone(), w, b, g))
    torch.cuda.synchronize()
    for out, exp in zip(results, expected):
        for step in out:
            for a, e in zip(step, exp):
                assert torch.equal(a, e), "a fused op on another stream changed the result"


def test_no_host_synchronisation():
    x, r, rm, rv, w, b = _inputs((8, 64, 28, 28), torch.bfloat16, True, True)
    grad = make_input(x.shape, x.dtype, True, shift=0.0)
    _training_step(x, r, rm, rv, w, b, grad)  # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    module = fusedres.BatchNormReLU2d(x.shape[1], momentum=None).cuda()  # cumulative average, on the device
    module(x, r).sum().backward()
    torch.cuda.synchronize()
    try:
        _training_step(x, r, rm, rv, w, b, grad)
        FF.add_relu(x, r).sum().backward()
        module(x, r).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_capture_of_a_training_step():
    x, r, rm, rv, w, b = _inputs((8, 64, 28, 28), torch.bfloat16, True, True)
    grad = make_input(x.shape, x.dtype, True, shift=0.0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _training_step(x, r, rm.clone(), rv.clone(), w, b, grad)  # warm up (compiles) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    rm_start, rv_start = rm.clone(), rv.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = _training_step(x, r, rm, rv, w, b, grad)
    rm.copy_(rm_start)
    rv.copy_(rv_start)
    graph.replay()
    torch.cuda.synchronize()
    expected = _training_step(x, r, rm_start, rv_start, w, b, grad)
    for a, e in zip(outputs, expected):
        assert torch.equal(a, e)
    assert torch.equal(rm, rm_start) and torch.equal(rv, rv_start)
    for _ in range(3):  # the graph's ticket counters are back at zero after every replay
        graph.replay()
        torch.cuda.synchronize()
        for a, e in zip(outputs, expected):
            assert torch.equal(a, e)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_tensors_device_not_the_current_one():
    with torch.cuda.device(0):
        x = make_input((4, 8, 5, 5), torch.float32).to("cuda:1")
        rm, rv, w, b = (t.to("cuda:1") for t in make_params(8, torch.float32))
        y = FF.batch_norm_relu(x, rm, rv, w, b, training=True)
    assert y.device == x.device
    assert_close(y, reference_batch_norm_act(fp64_copy(x), None, None, None, fp64_copy(w), fp64_copy(b), True),
                 "output")


MULTI_GPU = pytest.mark.skipif(not torch.distributed.is_nccl_available() or torch.cuda.device_count() < 2,
                               reason="needs two GPUs and NCCL")


@MULTI_GPU
@pytest.mark.parametrize("sizes,dtype,activation,residual", [
    ([3, 1], torch.float32, "relu", True),
    ([2, 0], torch.float32, "silu", True),  # an empty rank
    ([1, 2], torch.float64, "identity", False),
], ids=["fp32-relu", "empty-rank-fp32-silu", "fp64-identity"])
def test_sync_batch_norm_act_over_nccl_matches_eager_on_the_concatenated_batch(sizes, dtype, activation, residual):
    from tests.distributed_workers import module_worker, run_ranks
    run_ranks(module_worker, len(sizes), "nccl", sizes, dtype, activation, residual, 0.1, True)


@MULTI_GPU
@pytest.mark.parametrize("synchronized", [True, False], ids=["convert_sync_batchnorm", "per-rank-statistics"])
def test_ddp_training_step_of_a_converted_resnet18_over_nccl(synchronized):
    pytest.importorskip("torchvision")
    from tests.distributed_workers import ddp_worker, run_ranks
    run_ranks(ddp_worker, 2, "nccl", synchronized)
