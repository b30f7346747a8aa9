"""batch_norm_relu and batch_norm_add_relu against eager PyTorch on fp64 copies of the same inputs."""
from __future__ import annotations

import pytest
import torch

import fusedres
import fusedres.functional as FF
from fusedres.activations import DERIVATIVE_FROM_OUTPUT
from fusedres.functional import ACTIVATIONS
from tests.helpers import (DEVICE, FULL, HALF_DTYPES, TOLERANCES, assert_close, fp64_copy, make_input, make_params,
                           reference_batch_norm_act)
from tests.pairwise import all_pairs, case_id


def _valid(case):
    if case["params"] == "fp32" and case["dtype"] not in HALF_DTYPES:
        return False  # "fp32 parameters" is the autocast combination, for half inputs only
    if not case["training"] and not case["buffers"]:
        return False  # eval mode needs running statistics
    return True


CASES = all_pairs({
    "dtype": [torch.float16, torch.bfloat16, torch.float32, torch.float64],
    "params": ["same", "fp32"],
    "channels_last": [False, True],
    "training": [True, False],
    "affine": ["none", "weight", "both"],
    "buffers": [True, False],
    "residual": ["none", "same", "other_dtype", "other_layout"],
    # (N, C, H, W); (N, C) and (N, C, L) (BatchNorm1d), (N, C, D, H, W) (BatchNorm3d): any rank, spatial flattened
    "shape": [(3, 37, 5, 7), (2, 20, 9, 11), (4, 3, 1, 13), (6, 20), (5, 12, 17), (2, 10, 3, 4, 5)],
    "activation": list(ACTIVATIONS),
}, valid=_valid)


def _residual(case, x):
    kind = case["residual"]
    if kind == "none":
        return None
    if kind == "other_dtype":
        dtype = {torch.float32: torch.float64, torch.float64: torch.float32}.get(x.dtype, torch.float32)
        return make_input(x.shape, dtype, case["channels_last"])
    return make_input(x.shape, x.dtype, case["channels_last"] != (kind == "other_layout"))


def _looser(*dtypes):
    """The dtype whose tolerance is the loosest: a wider residual widens the output, not the batch-norm's precision."""
    return max(dtypes, key=lambda d: TOLERANCES[d].rtol)


def run_case(case, momentum=0.1, eps=1e-5):
    dtype, activation = case["dtype"], case["activation"]
    param_dtype = torch.float32 if case["params"] == "fp32" else dtype
    x = make_input(case["shape"], dtype, case["channels_last"])
    residual = _residual(case, x)
    rm, rv, w, b = make_params(x.shape[1], param_dtype, affine=case["affine"] != "none", buffers=case["buffers"])
    if case["affine"] == "weight":
        b = None
    leaves = {"input": x, "residual": residual, "weight": w, "bias": b}
    leaves = {k: v.requires_grad_() for k, v in leaves.items() if v is not None}
    ref_leaves = {k: fp64_copy(v, requires_grad=True) for k, v in leaves.items()}
    ref_rm, ref_rv = fp64_copy(rm), fp64_copy(rv)

    if activation != "relu":
        y = FF.batch_norm_act(x, rm, rv, w, b, case["training"], momentum, eps, residual=residual,
                              activation=activation, negative_slope=0.2)
    elif residual is None:
        y = FF.batch_norm_relu(x, rm, rv, w, b, case["training"], momentum, eps)
    else:
        y = FF.batch_norm_add_relu(x, residual, rm, rv, w, b, case["training"], momentum, eps)
    expected_dtype = dtype if residual is None else torch.promote_types(dtype, residual.dtype)
    # with a residual, the ReLU family's derivative is read from the saved output, in its precision
    from_output = residual is not None and activation in DERIVATIVE_FROM_OUTPUT and expected_dtype in HALF_DTYPES
    y_ref = reference_batch_norm_act(ref_leaves["input"], ref_leaves.get("residual"), ref_rm, ref_rv,
                                     ref_leaves.get("weight"), ref_leaves.get("bias"), case["training"], momentum,
                                     eps, activation, 0.2, derivative_dtype=expected_dtype if from_output else None)
    assert y.dtype == expected_dtype
    eager_strides = reference_batch_norm_act(x.detach(), None if residual is None else residual.detach(),
                                             None, None, None, None, True).stride()
    assert y.stride() == eager_strides, f"output strides {y.stride()} != eager's {eager_strides}"
    assert_close(y, y_ref, "output", dtype=_looser(y.dtype, dtype))
    if rm is not None:
        assert_close(rm, ref_rm, "running_mean")
        assert_close(rv, ref_rv, "running_var")

    grad_y = make_input(y.shape, y.dtype, case["channels_last"], scale=1.0, shift=0.0)
    grads = torch.autograd.grad(y, list(leaves.values()), grad_y)
    ref_grads = torch.autograd.grad(y_ref, list(ref_leaves.values()), grad_y.double())
    for (name, leaf), grad, ref_grad in zip(leaves.items(), grads, ref_grads):
        assert grad.dtype == leaf.dtype, f"grad of {name}: dtype {grad.dtype} != {leaf.dtype}"
        assert_close(grad, ref_grad, f"grad of {name}", dtype=_looser(grad.dtype, dtype))


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_matches_eager(case):
    run_case(case)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype,param_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float16)])
def test_running_statistics_after_several_steps(dtype, param_dtype, channels_last):
    rm, rv, w, b = make_params(24, param_dtype)
    ref_rm, ref_rv = fp64_copy(rm), fp64_copy(rv)
    for step in range(3):
        x = make_input((3, 24, 6, 5), dtype, channels_last, scale=1.0 + step, shift=step - 1.0)
        FF.batch_norm_relu(x, rm, rv, w, b, training=True, momentum=0.3)
        reference_batch_norm_act(fp64_copy(x), None, ref_rm, ref_rv, fp64_copy(w), fp64_copy(b), True, 0.3)
    assert_close(rm, ref_rm, "running_mean")
    assert_close(rv, ref_rv, "running_var")


@pytest.mark.parametrize("residual", [False, True])
def test_inference_with_batch_of_one(residual):
    x = make_input((1, 6, 3, 5), torch.float32)
    r = make_input(x.shape, torch.float32) if residual else None
    rm, rv, w, b = make_params(6, torch.float32)
    y = FF.batch_norm_add_relu(x, r, rm, rv, w, b) if residual else FF.batch_norm_relu(x, rm, rv, w, b)
    ref = reference_batch_norm_act(fp64_copy(x), fp64_copy(r), fp64_copy(rm), fp64_copy(rv), fp64_copy(w),
                                   fp64_copy(b), False)
    assert_close(y, ref, "output")


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_behaves_as_eager(training):
    x = torch.empty((0, 4, 3, 3), device=DEVICE, requires_grad=True)
    rm, rv, w, b = make_params(4, torch.float32)
    w.requires_grad_()
    before = (rm.clone(), rv.clone())
    y = FF.batch_norm_relu(x, rm, rv, w, b, training)
    assert y.shape == x.shape
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w))


# gradcheck in the quick tier: ReLU (the kink's derivative at ties) and Mish (the most arithmetic), in every mode;
# the other activations (1-3 s each) are --full (the pairwise matrix checks their gradients against eager).
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", [a if a in ("relu", "mish") else pytest.param(a, marks=FULL)
                                        for a in ACTIVATIONS])
def test_gradcheck_float64(residual, training, activation):
    channels_last = ACTIVATIONS.index(activation) % 2 == 1
    x = make_input((2, 3, 3, 4), torch.float64, channels_last).requires_grad_()
    r = make_input(x.shape, torch.float64, channels_last).requires_grad_() if residual else None
    rm, rv, w, b = make_params(3, torch.float64)
    w.requires_grad_()
    b.requires_grad_()

    def fn(x, w, b, *r):
        return FF.batch_norm_act(x, rm.clone(), rv.clone(), w, b, training, residual=r[0] if r else None,
                                 activation=activation, negative_slope=0.2)

    assert torch.autograd.gradcheck(fn, (x, w, b) + ((r,) if residual else ()), fast_mode=True)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_and_inf_propagate_per_activation(activation, training):
    """Outputs and gradients, NaN and Inf included, where eager has them, with and without a residual (the
    activations' derivatives at NaN differ: relu passes the gradient through, relu6 stops it, the smooth ones give
    NaN)."""
    channels_last = ACTIVATIONS.index(activation) % 2 == 0
    x = make_input((2, 5, 3, 4), torch.float32, channels_last)
    r = make_input(x.shape, torch.float32, channels_last)
    x[0, 1, 1, 1] = float("nan")
    x[1, 2, 0, 3] = float("inf")
    r[1, 3, 2, 2] = float("nan")
    r[0, 4, 0, 0] = float("-inf")
    r[1, 0, 1, 0] = float("inf")
    rm, rv, w, b = make_params(5, torch.float32)
    for residual in (None, r):
        leaves = [t.detach().requires_grad_() for t in (x, residual) if t is not None]
        y = FF.batch_norm_act(leaves[0], rm.clone(), rv.clone(), w, b, training,
                              residual=leaves[1] if residual is not None else None, activation=activation,
                              negative_slope=0.2)
        leaves64 = [fp64_copy(t, True) for t in leaves]
        ref = reference_batch_norm_act(leaves64[0], leaves64[1] if residual is not None else None, fp64_copy(rm),
                                       fp64_copy(rv), fp64_copy(w), fp64_copy(b), training, activation=activation,
                                       slope=0.2)
        assert torch.isnan(y).any()
        assert_close(y, ref, "output")
        g = make_input(y.shape, torch.float32, channels_last, shift=0.0)
        for name, grad, ref_grad in zip(("input", "residual"), torch.autograd.grad(y, leaves, g),
                                        torch.autograd.grad(ref, leaves64, g.double())):
            assert_close(grad, ref_grad, f"grad of {name} (residual: {residual is not None})")


def test_expanded_and_non_dense_gradients():
    x = make_input((2, 6, 4, 5), torch.float32, channels_last=True).requires_grad_()
    rm, rv, w, b = make_params(6, torch.float32)
    FF.batch_norm_relu(x, rm, rv, w, b, True).sum().backward()  # grad_output is an expanded scalar
    x64 = fp64_copy(x, requires_grad=True)
    reference_batch_norm_act(x64, None, None, None, fp64_copy(w), fp64_copy(b), True).sum().backward()
    assert_close(x.grad, x64.grad, "grad of input (expanded grad_output)")
    x.grad = None
    x64.grad = None
    g = make_input((2, 6, 4, 10), torch.float32)[..., ::2]  # non-dense grad_output
    FF.batch_norm_relu(x, None, None, w, b, True).backward(g)
    reference_batch_norm_act(x64, None, None, None, fp64_copy(w), fp64_copy(b), True).backward(g.double())
    assert_close(x.grad, x64.grad, "grad of input (strided grad_output)")


@pytest.mark.parametrize("channels_last", [False, True])
def test_non_dense_input_gives_eager_layout(channels_last):
    x = make_input((2, 5, 4, 12), torch.float32, channels_last)[..., 1::2]
    r = make_input((2, 5, 4, 6), torch.float32)
    rm, rv, w, b = make_params(5, torch.float32)
    y = FF.batch_norm_add_relu(x, r, rm, rv, w, b)
    ref = reference_batch_norm_act(x, r, rm, rv, w, b, False)
    assert y.stride() == ref.stride()
    assert_close(y, reference_batch_norm_act(fp64_copy(x), fp64_copy(r), fp64_copy(rm), fp64_copy(rv),
                                             fp64_copy(w), fp64_copy(b), False), "output")


@pytest.mark.parametrize("residual_dtype", [torch.float16, torch.float64])
def test_residual_of_another_dtype_promotes(residual_dtype):
    x = make_input((2, 5, 3, 7), torch.float32).requires_grad_()
    r = make_input(x.shape, residual_dtype).requires_grad_()
    rm, rv, w, b = make_params(5, torch.float32)
    y = FF.batch_norm_add_relu(x, r, rm, rv, w, b, training=True)
    x64, r64 = fp64_copy(x, True), fp64_copy(r, True)
    y64 = reference_batch_norm_act(x64, r64, None, None, fp64_copy(w), fp64_copy(b), True)
    assert y.dtype == torch.promote_types(torch.float32, residual_dtype)
    # the fp32 batch-norm rounds once as eager's does; the fp64 residual keeps its digits
    assert_close(y, y64, "output", dtype=torch.float32)
    y.backward(torch.ones_like(y))
    y64.backward(torch.ones_like(y64))
    assert r.grad.dtype == residual_dtype
    assert_close(r.grad, r64.grad, "grad of residual")
    assert_close(x.grad, x64.grad, "grad of input")


def test_autocast_activations_with_float32_parameters():
    conv = torch.nn.Conv2d(3, 6, 3, padding=1, bias=False).to(DEVICE)
    rm, rv, w, b = make_params(6, torch.float32)
    x = make_input((2, 3, 6, 5), torch.float32)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        h = conv(x)
        y = FF.batch_norm_relu(h, rm.clone(), rv.clone(), w, b, training=True)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    ref = reference_batch_norm_act(fp64_copy(h), None, None, None, fp64_copy(w), fp64_copy(b), True)
    assert_close(y, ref, "output")


def test_double_backward_raises_clearly():
    x = make_input((2, 3, 4, 4), torch.float64).requires_grad_()
    y = FF.batch_norm_relu(x, None, None, None, None, True)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_disabled_runs_eager_pytorch(monkeypatch):
    calls = []
    monkeypatch.setattr("fusedres.kernels.batch_norm.launch", lambda *a, **k: calls.append(a))
    x = make_input((2, 3, 4, 4), torch.float32)
    rm, rv, w, b = make_params(3, torch.float32)
    with fusedres.disabled():
        y = FF.batch_norm_relu(x, rm.clone(), rv.clone(), w, b, True)
    assert not calls
    assert torch.equal(y, reference_batch_norm_act(x, None, rm.clone(), rv.clone(), w, b, True))
    FF.batch_norm_relu(x, rm.clone(), rv.clone(), w, b, True)
    assert calls, "outside disabled() the kernels must run"
