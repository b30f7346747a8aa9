"""GPU-only checks of what depends on programs and streams running at once: bitwise determinism, two streams,
no host synchronisation, CUDA-graph capture (the ticket counters back at zero after every replay), the device
guard, and synchronized batch-norm over NCCL. Skipped without a CUDA GPU (the interpreter runs programs one after
another and shows none of these). The merges' own stress tests are tests/test_merges.py (both on a GPU and in the
interpreter); ResNet-sized shapes, tests/test_gpu_shapes.py."""
from __future__ import annotations

import pytest
import torch

import fusedres
import fusedres.functional as FF
from tests.helpers import (INTERPRETING, assert_close, fp64_copy, make_input, make_params, reference_batch_norm_act,
                           training_inputs, training_step)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(INTERPRETING or not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("channels_last", [False, True])
def test_bitwise_deterministic(channels_last):
    x, r, rm, rv, w, b = training_inputs((32, 256, 28, 28), torch.bfloat16, channels_last, True)
    grad = make_input(x.shape, x.dtype, channels_last, shift=0.0)
    first = training_step(x, r, rm.clone(), rv.clone(), w, b, grad)
    for _ in range(3):
        again = training_step(x, r, rm.clone(), rv.clone(), w, b, grad)
        for a, b_ in zip(first, again):
            assert torch.equal(a, b_), "results differ between identical calls"


@pytest.mark.parametrize("channels_last", [False, True])
def test_save_memory_recomputes_the_output_bitwise(channels_last):
    """save_memory's recomputation (fusedres.memory) is the forward's launch again: bitwise its output, and it keeps
    less memory after a training forward than the same model without it."""
    from fusedres.memory import Recompute

    x, _, rm, rv, w, b = training_inputs((32, 64, 56, 56), torch.bfloat16, channels_last, False)
    with fusedres.saving_memory():
        y = FF.batch_norm_act(x, rm, rv, w, b, True, activation="silu")
    recompute = getattr(y, "_fusedres_recompute")
    assert isinstance(recompute, Recompute)
    assert torch.equal(recompute.recompute(y._version), y)
    torchvision = pytest.importorskip("torchvision")
    from fusedres.benchmark.memory_use import retained_bytes

    model = torchvision.models.resnet18().cuda()
    images = torch.randn(16, 3, 112, 112, device="cuda")
    kept = retained_bytes(fusedres.convert(model), images)
    assert retained_bytes(fusedres.convert(model, save_memory=True), images) < 0.8 * kept


def test_two_streams_at_once_match_one_stream():
    shapes = [(16, 64, 56, 56), (16, 512, 7, 7)]
    inputs = [training_inputs(shape, torch.bfloat16, True, True) for shape in shapes]
    grads = [make_input(shape, torch.bfloat16, True, shift=0.0) for shape in shapes]
    expected = [training_step(x, r, rm.clone(), rv.clone(), w, b, g) for (x, r, rm, rv, w, b), g in
                zip(inputs, grads)]
    streams = [torch.cuda.Stream() for _ in shapes]
    torch.cuda.synchronize()
    results = [[] for _ in shapes]
    for _ in range(20):
        for stream, (x, r, rm, rv, w, b), g, out in zip(streams, inputs, grads, results):
            with torch.cuda.stream(stream):
                out.append(training_step(x, r, rm.clone(), rv.clone(), w, b, g))
    torch.cuda.synchronize()
    for out, exp in zip(results, expected):
        for step in out:
            for a, e in zip(step, exp):
                assert torch.equal(a, e), "a fused op on another stream changed the result"


def test_no_host_synchronisation():
    x, r, rm, rv, w, b = training_inputs((8, 64, 28, 28), torch.bfloat16, True, True)
    grad = make_input(x.shape, x.dtype, True, shift=0.0)
    training_step(x, r, rm, rv, w, b, grad)  # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    module = fusedres.BatchNormReLU2d(x.shape[1], momentum=None).cuda()  # cumulative average, on the device
    module(x, r).sum().backward()
    torch.cuda.synchronize()
    try:
        training_step(x, r, rm, rv, w, b, grad)
        FF.add_relu(x, r).sum().backward()
        module(x, r).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_capture_of_atraining_step():
    x, r, rm, rv, w, b = training_inputs((8, 64, 28, 28), torch.bfloat16, True, True)
    grad = make_input(x.shape, x.dtype, True, shift=0.0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        training_step(x, r, rm.clone(), rv.clone(), w, b, grad)  # warm up (compiles) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    rm_start, rv_start = rm.clone(), rv.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = training_step(x, r, rm, rv, w, b, grad)
    rm.copy_(rm_start)
    rv.copy_(rv_start)
    graph.replay()
    torch.cuda.synchronize()
    expected = training_step(x, r, rm_start, rv_start, w, b, grad)
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
