"""Regression tests for the contract cases found by probing the public functions as a user would (issue 11): each
test is named after what it guards, and compares with eager PyTorch on fp64 copies."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.utils.checkpoint as checkpoint

import fusedres
import fusedres.functional as FF
from tests.helpers import DEVICE, assert_close, fp64_copy, make_input, make_params, reference_batch_norm_act


def _columns(*columns):
    """Columns of one matrix: per-channel tensors with stride len(columns) that share storage."""
    matrix = torch.stack([c.to(DEVICE) for c in columns], 1)
    return matrix, [matrix[:, i] for i in range(len(columns))]


@pytest.mark.parametrize("channels_last", [False, True])
def test_strided_weight_and_bias_match_eager(channels_last):
    x = make_input((3, 4, 5, 6), torch.float32, channels_last).requires_grad_()
    _, (w, b) = _columns(torch.randn(4), torch.randn(4))
    y = FF.batch_norm_relu(x, None, None, w, b, True, 0.1, 1e-5)
    x64 = fp64_copy(x, True)
    y64 = reference_batch_norm_act(x64, None, None, None, w.double(), b.double(), True)
    assert_close(y, y64, "output")
    g = make_input(x.shape, torch.float32, channels_last, shift=0.0)
    (dx,) = torch.autograd.grad(y, x, g)
    (dx64,) = torch.autograd.grad(y64, x64, g.double())
    assert_close(dx, dx64, "grad of input")


def test_strided_weight_gradients_match_eager():
    x = make_input((3, 4, 5, 6), torch.float32)
    params = torch.randn(4, 2, device=DEVICE).requires_grad_()
    params64 = fp64_copy(params, True)
    g = make_input(x.shape, torch.float32, shift=0.0)
    FF.batch_norm_relu(x, None, None, params[:, 0], params[:, 1], True).backward(g)
    reference_batch_norm_act(fp64_copy(x), None, None, None, params64[:, 0], params64[:, 1], True).backward(
        g.double())
    assert_close(params.grad, params64.grad, "grad of the parameter matrix")


@pytest.mark.parametrize("training", [True, False])
def test_strided_running_statistics_are_updated_in_place_and_nothing_else(training):
    x = make_input((3, 4, 5, 6), torch.float32)
    matrix, (rm, sentinel, rv) = _columns(torch.randn(4) * 0.3, torch.randn(4), torch.rand(4) + 0.5)
    sentinel_before = sentinel.clone()
    ref_rm, ref_rv = fp64_copy(rm), fp64_copy(rv)
    y = FF.batch_norm_relu(x, rm, rv, None, None, training, 0.1, 1e-5)
    y64 = reference_batch_norm_act(fp64_copy(x), None, ref_rm, ref_rv, None, None, training)
    assert_close(y, y64, "output")
    assert_close(rm, ref_rm, "running_mean (a column)")
    assert_close(rv, ref_rv, "running_var (a column)")
    assert torch.equal(sentinel, sentinel_before), "the column between the running statistics was written"


def test_expanded_weight_and_running_statistics_are_read_through_stride_zero():
    x = make_input((3, 4, 5, 6), torch.float32)
    w = torch.tensor(1.5, device=DEVICE).expand(4)
    rm, rv = torch.tensor(0.2, device=DEVICE).expand(4), torch.tensor(0.7, device=DEVICE).expand(4)
    y = FF.batch_norm_relu(x, None, None, w, None, True, 0.1, 1e-5)
    assert_close(y, reference_batch_norm_act(fp64_copy(x), None, None, None, w.double(), None, True), "training")
    y = FF.batch_norm_relu(x, rm, rv, w, None, False, 0.1, 1e-5)
    assert_close(y, reference_batch_norm_act(fp64_copy(x), None, rm.double(), rv.double(), w.double(), None, False),
                 "inference with expanded running statistics")


def test_expanded_running_statistics_are_refused_when_training():
    x = make_input((3, 4, 5, 6), torch.float32)
    storage = torch.zeros(1, device=DEVICE)
    with pytest.raises(ValueError, match="batch_norm_relu: running_mean is updated in place"):
        FF.batch_norm_relu(x, storage.expand(4), torch.ones(4, device=DEVICE), training=True)
    assert torch.equal(storage, torch.zeros(1, device=DEVICE))


@pytest.mark.parametrize("shape", [(2, 4, 0, 3), (0, 4, 3, 3), (2, 0, 3, 3), (3, 0)])
def test_add_relu_on_empty_tensors_returns_empty_as_eager(shape):
    x = torch.randn(shape, device=DEVICE).requires_grad_()
    r = torch.randn(shape, device=DEVICE)
    y = FF.add_relu(x, r)
    assert y.shape == torch.Size(shape) and y.stride() == torch.relu(x.detach() + r).stride()
    y.sum().backward()
    assert x.grad.shape == torch.Size(shape)


@pytest.mark.parametrize("infinity", [float("inf"), float("-inf")])
def test_infinite_running_variance_stays_infinite_as_eager(infinity):
    x = make_input((3, 4, 5, 6), torch.float32)
    rm, rv = torch.zeros(4, device=DEVICE), torch.tensor([1.0, infinity, 1.0, 1.0], device=DEVICE)
    ref_rm, ref_rv = fp64_copy(rm), fp64_copy(rv)
    FF.batch_norm_relu(x, rm, rv, None, None, True, 0.1, 1e-5)
    reference_batch_norm_act(fp64_copy(x), None, ref_rm, ref_rv, None, None, True)
    assert rv[1] == infinity
    assert_close(rv, ref_rv, "running_var")
    assert_close(rm, ref_rm, "running_mean")


@pytest.mark.parametrize("eps,training,message", [(0.0, True, "eps must be positive when training"),
                                                   (-1e-5, True, "eps must be positive when training"),
                                                   (-1e-5, False, "eps must be non-negative"),
                                                   (float("nan"), False, "eps must be non-negative")])
def test_eps_out_of_range_is_refused_before_anything_is_touched(eps, training, message):
    x = make_input((3, 4, 5, 6), torch.float32)
    rm, rv, w, b = make_params(4, torch.float32)
    before = (rm.clone(), rv.clone())
    with pytest.raises(ValueError, match=f"batch_norm_relu: {message}"):
        FF.batch_norm_relu(x, rm, rv, w, b, training, 0.1, eps)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


def test_zero_eps_in_evaluation_matches_eager():
    x = make_input((3, 4, 5, 6), torch.float32)
    rm, rv, w, b = make_params(4, torch.float32)
    y = FF.batch_norm_relu(x, rm, rv, w, b, False, 0.1, 0.0)
    assert_close(y, reference_batch_norm_act(*(fp64_copy(t) for t in (x, None, rm, rv, w, b)), False, eps=0.0),
                 "output")


@pytest.mark.parametrize("training", [True, False])
def test_running_statistics_that_require_grad_are_refused(training):
    x = make_input((3, 4, 5, 6), torch.float32)
    rm, rv, w, b = make_params(4, torch.float32)
    rm = torch.nn.Parameter(rm)
    before = rm.detach().clone()
    with pytest.raises(ValueError, match="batch_norm_relu: running_mean requires grad"):
        FF.batch_norm_relu(x, rm, rv, w, b, training)
    assert torch.equal(rm.detach(), before)


def test_weight_that_is_the_running_variance_matches_eager():
    # Eager updates the running statistics before it normalises: a weight aliasing running_var is read updated.
    x = make_input((3, 4, 5, 6), torch.float32)
    rm, rv, _, b = make_params(4, torch.float32)
    ref_rm, ref_rv = fp64_copy(rm), fp64_copy(rv)
    y = FF.batch_norm_relu(x, rm, rv, rv, b, True, 0.1, 1e-5)
    y64 = reference_batch_norm_act(fp64_copy(x), None, ref_rm, ref_rv, ref_rv, fp64_copy(b), True)
    assert_close(y, y64, "output")
    assert_close(rv, ref_rv, "running_var")


def test_running_mean_that_is_a_view_of_the_input_matches_eager():
    x = make_input((3, 4, 5, 6), torch.float32)
    x64 = fp64_copy(x)
    rv = torch.rand(4, device=DEVICE) + 0.5
    ref_rv = fp64_copy(rv)
    y = FF.batch_norm_relu(x, x[0, :, 0, 0], rv, None, None, True, 0.1, 1e-5)
    y64 = reference_batch_norm_act(x64, None, x64[0, :, 0, 0], ref_rv, None, None, True)
    assert_close(x, x64, "input (its running_mean view updated in place)")
    assert_close(y, y64, "output")


def test_overlapping_running_statistics_are_refused_when_training():
    x = make_input((3, 4, 5, 6), torch.float32)
    storage = torch.rand(5, device=DEVICE) + 0.5
    before = storage.clone()
    with pytest.raises(ValueError, match="batch_norm_relu: running_mean and running_var share memory"):
        FF.batch_norm_relu(x, storage[:4], storage[1:], training=True)
    assert torch.equal(storage, before)


def _checkpointed_block_statistics(block, x, early_stop: bool):
    with checkpoint.set_checkpoint_early_stop(early_stop):
        checkpoint.checkpoint(block, x, use_reentrant=False).sum().backward()
    return {name: buffer.clone() for name, buffer in block.named_buffers()}


@pytest.mark.parametrize("early_stop", [True, False])
def test_gradient_checkpointing_updates_running_statistics_as_eager(early_stop):
    torchvision = pytest.importorskip("torchvision")
    eager = torchvision.models.resnet.BasicBlock(8, 8).double().to(DEVICE).train()
    fused = fusedres.convert(copy.deepcopy(eager))
    assert fusedres.conversion_report(fused)["batch_norm_add_relu"], "the block must have a fused add site"
    x = make_input((2, 8, 5, 5), torch.float64)
    expected = _checkpointed_block_statistics(eager, x, early_stop)
    got = _checkpointed_block_statistics(fused, x, early_stop)
    assert int(expected["bn1.num_batches_tracked"]) == 2  # the recomputation runs every batch-norm again
    for name, value in expected.items():
        if value.dtype.is_floating_point:
            assert_close(got[name], value, name)
        else:
            assert torch.equal(got[name], value), name
