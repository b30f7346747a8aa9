"""The launchers directly: outputs poisoned with NaN beforehand (an element left unwritten shows), small tiles so
that every mask and tail is hit, many splits so that the last-program merges run over many partial rows, both
walks (rows and slabs) on the same shapes, and the 64-bit offset path."""
from __future__ import annotations

import pytest
import torch

import fusedres.functional as FF
from fusedres.kernels import add_act as AK
from fusedres.kernels import batch_norm as BK
from fusedres.kernels import ACTIVATIONS, DERIVATIVE_FROM_OUTPUT, forced_int64
from tests.helpers import (DEVICE, FULL, REFERENCE_ACTIVATIONS, assert_close, fp64_copy, make_input, make_params,
                           reference_batch_norm_act)

# (block_rows, block_channels, target_programs, slab); none given: the shape heuristic. A slab's rows are all of
# H*W, so it takes no block_rows.
TILES = [dict(block_rows=4, block_channels=4, target_programs=64, slab=False),
         dict(block_rows=8, block_channels=2, target_programs=7, slab=False),
         dict(block_rows=16, block_channels=16, target_programs=1024, slab=False),
         dict(block_channels=4, target_programs=64, slab=True),
         dict(block_channels=16, target_programs=1, slab=True),
         dict()]
SHAPE = (3, 11, 5, 3)


def poisoned(*shape_or_like, dtype=None, like=None):
    t = torch.empty_like(like, dtype=dtype) if like is not None else torch.empty(*shape_or_like, dtype=dtype,
                                                                                   device=DEVICE)
    return t.fill_(float("nan"))


def _stats64(x):
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    return mean, var


@pytest.mark.parametrize("tiles", TILES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_stats(tiles, channels_last, dtype):
    x = make_input(SHAPE, dtype, channels_last)
    if tiles.get("slab") and channels_last:
        pytest.skip("the slab walk is for NCHW")
    mean, var = poisoned(SHAPE[1], dtype=torch.float32), poisoned(SHAPE[1], dtype=torch.float32)
    BK.bn_batch_stats(x, mean, var, **tiles)
    ref_mean, ref_var = _stats64(x)
    assert_close(mean, ref_mean, "mean")
    assert_close(var, ref_var, "var")


def test_batch_stats_are_stable_for_a_large_offset():
    # E[x^2] - E[x]^2 would lose every digit of this variance in fp32; Welford/Chan merges keep it.
    x = make_input(SHAPE, torch.float32, scale=1.0, shift=0.0) + 1e4
    mean, var = poisoned(SHAPE[1], dtype=torch.float32), poisoned(SHAPE[1], dtype=torch.float32)
    BK.bn_batch_stats(x, mean, var, **TILES[0])
    assert_close(var, _stats64(x)[1], "var", dtype=torch.float16)


@pytest.mark.parametrize("tiles", TILES, ids=str)
@pytest.mark.parametrize("layouts", [("nchw", "nchw"), ("cl", "cl"), ("nchw", "cl")])
def test_apply(tiles, layouts):
    x = make_input(SHAPE, torch.float32, layouts[0] == "cl")
    r = make_input(SHAPE, torch.float16, layouts[1] == "cl")
    if "cl" in layouts and (tiles.get("slab") or BK._plan(x, **tiles)[1].slab):
        pytest.skip("a slab walk reads NCHW operands only (the op layer copies the others)")
    rm, rv, w, b = make_params(SHAPE[1], torch.float32)
    y = poisoned(like=x)
    BK.bn_act_apply(x, r, rm, rv, w, b, 1e-5, y, **tiles)
    ref = reference_batch_norm_act(fp64_copy(x), fp64_copy(r), fp64_copy(rm), fp64_copy(rv), fp64_copy(w),
                                   fp64_copy(b), False)
    assert_close(y, ref, "output")


def test_apply_refuses_a_residual_it_cannot_walk():
    x = make_input(SHAPE, torch.float32, channels_last=True)
    r = make_input(SHAPE, torch.float32)
    rm, rv, w, b = make_params(SHAPE[1], torch.float32)
    assert not BK.walkable(x, r)
    with pytest.raises(ValueError, match="cannot be walked"):
        BK.bn_act_apply(x, r, rm, rv, w, b, 1e-5, torch.empty_like(x))


# The backward's passes in the quick tier: tiny tiles (every mask and tail, many splits), a slab walk, the shape
# heuristic; the other tilings (1-5 s each) are --full.
@pytest.mark.parametrize("tiles", [t if i in (0, 3, 5) else pytest.param(t, marks=FULL) for i, t in enumerate(TILES)],
                         ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_backward_passes(tiles, channels_last, with_residual):
    """Training backward: reduce (dz, sums, dweight, dbias), then dx; eval backward: reduce writes dx."""
    if tiles.get("slab") and channels_last:
        pytest.skip("the slab walk is for NCHW")
    x = make_input(SHAPE, torch.float32, channels_last)
    r = make_input(SHAPE, torch.float32, channels_last) if with_residual else None
    _, _, w, b = make_params(SHAPE[1], torch.float32)
    mean, var = _stats64(x)
    mean, var = mean.float(), var.float()
    y = torch.empty_like(x)
    BK.bn_act_apply(x, r, mean, var, w, b, 1e-5, y, **tiles)
    g = make_input(SHAPE, torch.float32, channels_last, shift=0.0)

    x64, w64, b64 = fp64_copy(x, True), fp64_copy(w, True), fp64_copy(b, True)
    y64 = reference_batch_norm_act(x64, fp64_copy(r), None, None, w64, b64, True)
    ref_dx, ref_dw, ref_db = torch.autograd.grad(y64, (x64, w64, b64), g.double())
    ref_dz = g.double() * (y64 > 0)

    sums = poisoned(2, SHAPE[1], dtype=torch.float32)
    dz = poisoned(like=y) if with_residual else None
    dw, db, dx = poisoned(like=w), poisoned(like=b), poisoned(like=x)
    BK.bn_act_backward_reduce(g, x, mean, var, w, b, 1e-5, output=y if with_residual else None, sums_out=sums,
                              grad_z_out=dz, grad_weight_out=dw, grad_bias_out=db, **tiles)
    BK.bn_backward_dx(dz if with_residual else g, x, mean, var, w, b, 1e-5, sums, grad_is_dy=not with_residual,
                      grad_x_out=dx, **tiles)
    assert_close(dw, ref_dw, "grad of weight")
    assert_close(db, ref_db, "grad of bias")
    assert_close(dx, ref_dx, "grad of input")
    if with_residual:
        assert_close(dz, ref_dz, "grad of residual")

    # Frozen statistics: dx = dz * weight * invstd, written by the reduction pass itself.
    y64 = reference_batch_norm_act(x64, fp64_copy(r), mean.double(), var.double(), w64, b64, False)
    (ref_dx,) = torch.autograd.grad(y64, (x64,), g.double())
    dx = poisoned(like=x)
    BK.bn_act_backward_reduce(g, x, mean, var, w, b, 1e-5, output=y if with_residual else None, sums_out=sums,
                              grad_x_out=dx, need_sums=False, **tiles)
    assert_close(dx, ref_dx, "grad of input (frozen statistics)")


@pytest.mark.parametrize("tiles", [TILES[0], TILES[3], dict()], ids=str)
@pytest.mark.parametrize("cumulative", [False, True])
def test_running_statistics_update_in_the_statistics_launch(cumulative, tiles):
    x = make_input(SHAPE, torch.float32)
    rm, rv, _, _ = make_params(SHAPE[1], torch.float32)
    nbt = torch.tensor(4, dtype=torch.long, device=DEVICE)
    factor = 0.25 if cumulative else 0.1
    ref_mean, ref_var = _stats64(x)
    count = x.numel() // SHAPE[1]
    ref_rm = (1 - factor) * rm.double() + factor * ref_mean
    ref_rv = (1 - factor) * rv.double() + factor * ref_var * count / (count - 1)
    mean, var = poisoned(SHAPE[1], dtype=torch.float32), poisoned(SHAPE[1], dtype=torch.float32)
    BK.bn_batch_stats(x, mean, var, rm, rv, momentum=0.1, num_batches_tracked=nbt if cumulative else None, **tiles)
    assert_close(rm, ref_rm, "running_mean")
    assert_close(rv, ref_rv, "running_var")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("block", [64, None])
def test_add_act_kernels(block, activation):
    x = make_input((3, 7, 5, 3), torch.bfloat16, shift=0.0)
    r = make_input((3, 7, 5, 3), torch.float32, shift=0.0)
    y = poisoned(like=r)
    AK.add_act_forward(x, r, y, activation=activation, slope=0.2, block=block)
    z64 = (x.double() + r.double()).requires_grad_()
    y64 = REFERENCE_ACTIVATIONS[activation](z64, 0.2)
    assert_close(y, y64, "output")
    g = make_input(y.shape, torch.float32, shift=0.0)
    (ref,) = torch.autograd.grad(y64, z64, g.double())
    dz = poisoned(like=y)
    AK.act_backward(g, x, r, dz, activation=activation, slope=0.2, block=block)  # from the two summands
    assert_close(dz, ref, "grad")
    if activation in DERIVATIVE_FROM_OUTPUT:
        dz = poisoned(like=y)
        AK.act_backward(g, y, None, dz, activation=activation, slope=0.2, block=block)  # from the output
        assert_close(dz, ref, "grad from the output")


@pytest.mark.parametrize("channels_last", [False, True])
def test_64_bit_offsets(channels_last):
    x = make_input((2, 6, 5, 3), torch.float32, channels_last).requires_grad_()
    r = make_input(x.shape, torch.float32, channels_last).requires_grad_()
    rm, rv, w, b = make_params(6, torch.float32)
    w.requires_grad_()
    ref_rm, ref_rv = fp64_copy(rm), fp64_copy(rv)
    leaves64 = [fp64_copy(t, True) for t in (x, r, w, b)]
    with forced_int64():
        y = FF.batch_norm_add_relu(x, r, rm, rv, w, b, training=True)
        grads = torch.autograd.grad(y, (x, r, w), torch.ones_like(y))
        z = FF.add_relu(x, r)
        (gz,) = torch.autograd.grad(z, (x,), torch.ones_like(z))
    y64 = reference_batch_norm_act(leaves64[0], leaves64[1], ref_rm, ref_rv, leaves64[2], leaves64[3], True)
    ref_grads = torch.autograd.grad(y64, leaves64[:3], torch.ones_like(y64))
    assert_close(y, y64, "output")
    assert_close(rm, ref_rm, "running_mean")
    for name, grad, ref in zip(("input", "residual", "weight"), grads, ref_grads):
        assert_close(grad, ref, f"grad of {name}")
    assert_close(z, torch.relu(x.double() + r.double()), "add_relu output")
    assert_close(gz, (x.double() + r.double() > 0).double(), "add_relu grad")
