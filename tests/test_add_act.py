"""add_relu and add_act against eager PyTorch on fp64 copies."""
from __future__ import annotations

import pytest
import torch

import fusedres.functional as FF
from fusedres.functional import ACTIVATIONS
from tests.helpers import (FLOAT_DTYPES, NAN_DERIVATIVE_DEPENDS_ON_LAYOUT, REFERENCE_ACTIVATIONS, TOLERANCES,
                           assert_close, fp64_copy, make_input)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layouts", [("nchw", "nchw"), ("cl", "cl"), ("cl", "nchw"), ("nchw", "cl")])
def test_matches_eager(dtype, layouts):
    x = make_input((3, 13, 5, 7), dtype, layouts[0] == "cl", shift=0.0).requires_grad_()
    r = make_input((3, 13, 5, 7), dtype, layouts[1] == "cl", shift=0.0).requires_grad_()
    y = FF.add_relu(x, r)
    x64, r64 = fp64_copy(x, True), fp64_copy(r, True)
    y_ref = torch.relu(x64 + r64)
    assert y.dtype == dtype and y.stride() == (x.detach() + r.detach()).stride()
    assert_close(y, y_ref, "output")
    g = make_input(y.shape, dtype, shift=0.0)
    gx, gr = torch.autograd.grad(y, (x, r), g)
    gx_ref, gr_ref = torch.autograd.grad(y_ref, (x64, r64), g.double())
    assert_close(gx, gx_ref, "grad of input")
    assert_close(gr, gr_ref, "grad of residual")


@pytest.mark.parametrize("shape", [(7,), (5, 3, 11), (2, 3, 4, 5, 6), ()])
def test_any_rank(shape):
    x = make_input(shape, torch.float32, shift=0.0)
    r = make_input(shape, torch.float32, shift=0.0)
    assert_close(FF.add_relu(x, r), torch.relu(x.double() + r.double()), "output")


def test_mixed_dtypes_promote_and_each_gradient_keeps_its_dtype():
    x = make_input((2, 3, 4, 5), torch.bfloat16, shift=0.0).requires_grad_()
    r = make_input((2, 3, 4, 5), torch.float32, shift=0.0).requires_grad_()
    y = FF.add_relu(x, r)
    assert y.dtype == torch.float32
    y_ref = torch.relu(x.double() + r.double())
    assert_close(y, y_ref, "output")
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and r.grad.dtype == torch.float32
    assert_close(r.grad, (y_ref > 0).double(), "grad of residual")


def test_nan_and_inf_propagate():
    x = make_input((4, 6), torch.float32, shift=0.0)
    r = make_input((4, 6), torch.float32, shift=0.0)
    x[0, 0], x[1, 1], r[2, 2], r[3, 3] = float("nan"), float("inf"), float("-inf"), float("nan")
    y = FF.add_relu(x, r)
    assert torch.isnan(y[0, 0]) and torch.isnan(y[3, 3]) and torch.isinf(y[1, 1]) and y[2, 2] == 0
    assert_close(y, torch.relu(x.double() + r.double()), "output")


def test_non_dense_inputs_and_empty():
    x = make_input((4, 10), torch.float32, shift=0.0)[:, ::2]
    r = make_input((5, 4), torch.float32, shift=0.0).t()
    assert_close(FF.add_relu(x, r), torch.relu(x.double() + r.double()), "output")
    e = torch.empty((0, 3), device=x.device)
    assert FF.add_relu(e, e).shape == (0, 3)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_matches_eager(activation):
    """Forward and both gradients; NaN and Inf where eager has them (derivatives at NaN per activation)."""
    dtype = FLOAT_DTYPES[ACTIVATIONS.index(activation) % len(FLOAT_DTYPES)]
    channels_last = ACTIVATIONS.index(activation) % 2 == 0
    x = make_input((3, 6, 5, 7), dtype, channels_last, shift=0.0)
    r = make_input((3, 6, 5, 7), torch.float32, not channels_last, shift=0.0)
    x[0, 0, 0, 0], r[1, 1, 1, 1], r[2, 2, 2, 2] = float("nan"), float("inf"), float("-inf")
    x, r = x.requires_grad_(), r.requires_grad_()
    y = FF.add_act(x, r, activation=activation, negative_slope=0.2)
    x64, r64 = fp64_copy(x, True), fp64_copy(r, True)
    y_ref = REFERENCE_ACTIVATIONS[activation](x64 + r64, 0.2)
    assert y.dtype == torch.promote_types(dtype, torch.float32)
    assert_close(y, y_ref, "output", dtype=dtype)
    g = make_input(y.shape, y.dtype, shift=0.0)
    grads = torch.autograd.grad(y, (x, r), g)
    compared = torch.ones_like(y, dtype=torch.bool)
    if activation in NAN_DERIVATIVE_DEPENDS_ON_LAYOUT:
        compared = ~torch.isnan(x64 + r64)
    for name, grad, ref, leaf in zip(("input", "residual"), grads, torch.autograd.grad(y_ref, (x64, r64), g.double()),
                                     (x, r)):
        assert grad.dtype == leaf.dtype
        looser = max((dtype, leaf.dtype), key=lambda d: TOLERANCES[d].rtol)
        assert_close(grad[compared], ref[compared], f"grad of {name}", dtype=looser)


def test_unknown_activation_is_refused_clearly():
    x = make_input((2, 3), torch.float32)
    with pytest.raises(ValueError, match="add_act: unsupported activation 'elu'; supported: identity, relu"):
        FF.add_act(x, x, activation="elu")
