"""Property-based tests of the public contract: for any shape (zero-sized dimensions and one value per channel
included), dtype, layout and strides of the activation and of every per-channel tensor, mode, momentum, eps and
residual, fusedres does what eager PyTorch does: the same output, gradients and running statistics (against
eager on fp64 copies, under the suite's tolerance table), or both raise, and a call that raises leaves every
argument bitwise unchanged.

CI runs fixed, database-free profiles (``derandomize``), sized for the interpreter: 25 examples per test in the
quick tier, 150 with ``--full``. A longer one, by hand:
``FUSEDRES_HYPOTHESIS_PROFILE=long python -m pytest tests/test_properties.py``.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import fusedres
import fusedres.functional as FF
from tests.helpers import DEVICE, FULL_TIER, TOLERANCES, assert_close

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

settings.register_profile("quick", derandomize=True, database=None, max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", derandomize=True, database=None, max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", database=None, max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
# The quick tier draws 25 examples per test, --full the CI profile's 150 (conftest.py sets the tier).
settings.load_profile(os.environ.get("FUSEDRES_HYPOTHESIS_PROFILE", "ci" if FULL_TIER else "quick"))

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ACTIVATION_LAYOUTS = ("contiguous", "channels_last", "sliced", "channels_first_storage", "expanded")
VECTOR_LAYOUTS = ("contiguous", "column", "strided", "expanded")


def _activation(shape, dtype, layout, generator):
    """A tensor of ``shape`` with fresh random values (never zeros) in one of several memory layouts."""
    n, c, h, w = shape
    if layout == "sliced":  # non-dense, with a storage offset
        full = torch.randn((n, c, h, 2 * w + 1), generator=generator)
        t = full[..., 1::2]
    elif layout == "channels_first_storage":  # C outermost in memory: neither NCHW nor channels_last
        t = torch.randn((c, n, h, w), generator=generator).permute(1, 0, 2, 3)
    elif layout == "expanded":  # every sample the same memory
        t = torch.randn((1, c, h, w), generator=generator).expand(n, c, h, w)
    else:
        t = torch.randn(shape, generator=generator)
        if layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
    return (t * 2 + 0.5).to(dtype=dtype, device=DEVICE)


def _vector(values, layout, generator):
    """A per-channel tensor holding ``values``, in one of several strides; "expanded" repeats the first value."""
    channels = values.numel()
    if layout == "column":  # a column of a matrix: stride 2, sharing storage with its neighbour column
        return torch.stack([values, torch.randn(channels, generator=generator).to(values.dtype)], 1)[:, 0]
    if layout == "strided":  # every third element, from an offset
        storage = torch.randn(3 * channels + 1, generator=generator).to(values.dtype)
        strided = storage[1::3][:channels]
        strided.copy_(values)
        return strided
    if layout == "expanded":
        return values[:1].expand(channels) if channels else values
    return values


@st.composite
def batch_norm_cases(draw):
    # Zero-sized dimensions and invalid eps values are drawn, but less often than the cases that compute.
    n, c, h, w = (draw(st.sampled_from([0, 1, 2, 2, 3, 3])), draw(st.sampled_from([0, 1, 2, 3, 4, 5, 3, 5])),
                  draw(st.sampled_from([0, 1, 2, 3, 4, 2, 3])), draw(st.integers(1, 4)))
    dtype = draw(st.sampled_from(DTYPES))
    affine_layouts = (None,) + VECTOR_LAYOUTS if c else (None,)  # eager raises IndexError on 0 channels with
    return dict(                                                  # weight or bias (a PyTorch bug): not drawn
        shape=(n, c, h, w), dtype=dtype,
        param_dtype=draw(st.sampled_from([dtype, torch.float32] if dtype in (torch.float16, torch.bfloat16)
                                         else [dtype])),
        layout=draw(st.sampled_from(ACTIVATION_LAYOUTS)),
        weight=draw(st.sampled_from(affine_layouts)), bias=draw(st.sampled_from(affine_layouts)),
        running=draw(st.sampled_from((None,) + VECTOR_LAYOUTS)),
        training=draw(st.booleans()),
        momentum=draw(st.sampled_from([0.0, 0.1, 1.0, 0.37])),
        eps=draw(st.sampled_from([1e-5, 1e-5, 1e-5, 1e-3, 1e-3, 0.0, -1e-4])),
        residual=draw(st.sampled_from([None, "same", "channels_last", "sliced"])),
        residual_dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _build(case):
    generator = torch.Generator().manual_seed(case["seed"])
    x = _activation(case["shape"], case["dtype"], case["layout"], generator)
    residual = None
    if case["residual"] is not None:
        layout = "contiguous" if case["residual"] == "same" else case["residual"]
        residual = _activation(case["shape"], case["residual_dtype"], layout, generator)
    c, pd = case["shape"][1], case["param_dtype"]
    vector = lambda values, layout: None if layout is None else _vector(values.to(pd), layout, generator)  # noqa
    weight = vector(torch.rand(c, generator=generator) + 0.5, case["weight"])
    bias = vector(torch.randn(c, generator=generator) * 0.5, case["bias"])
    running_mean = vector(torch.randn(c, generator=generator) * 0.5, case["running"])
    running_var = vector(torch.rand(c, generator=generator) + 0.5, case["running"])
    return dict(input=x, residual=residual, running_mean=running_mean, running_var=running_var, weight=weight,
                bias=bias)


def _differentiable(tensors: dict) -> dict:
    """Leaves that require grad: the activation, the residual, weight and bias (what a training step differentiates)."""
    leaves = {}
    for name in ("input", "residual", "weight", "bias"):
        t = tensors[name]
        if t is not None and t.numel() > 0:
            leaves[name] = t.detach().requires_grad_()
    return leaves


def _eager(tensors, case, *, dtype=None):
    """The pre-activation F.batch_norm(...) [+ residual] in eager PyTorch, on copies (the running statistics
    copied too, so their update can be compared). With ``dtype`` (the fp64 reference) the per-channel copies are
    contiguous: eager's CPU backward misreads strided running statistics in evaluation mode (PyTorch 2.14: it
    gives 1 / sqrt(eps) for dx when running_mean and running_var are columns of matrices), and the reference
    must be right; the values are the same."""
    def copy(name, t):
        if t is None:
            return None
        if dtype is None:
            return t.detach().clone()
        t = t.detach().to(dtype, copy=True)
        return t if name in ("input", "residual") else t.contiguous()

    copies = {name: copy(name, t) for name, t in tensors.items()}
    leaves = {name: copies[name].requires_grad_() for name in _differentiable(tensors)}
    copies.update(leaves)
    y = F.batch_norm(copies["input"], copies["running_mean"], copies["running_var"], copies["weight"],
                     copies["bias"], case["training"], case["momentum"], case["eps"])
    if copies["residual"] is not None:
        y = y + copies["residual"]
    return y, copies, leaves


def _snapshot(tensors: dict) -> dict:
    return {name: t.detach().clone() for name, t in tensors.items() if t is not None}


def _assert_unchanged(tensors: dict, before: dict) -> None:
    for name, value in before.items():
        assert torch.equal(tensors[name].detach(), value), f"{name} was modified by a call that raised"


def _refused_by_contract(tensors, case) -> str | None:
    """What fusedres refuses where eager runs (README: running statistics are updated in place when training,
    so an expanded one, whose channels share one memory location, is refused)."""
    rm = tensors["running_mean"]
    if case["training"] and rm is not None and rm.numel() > 1 and rm.stride(0) == 0:
        return "is updated in place when training"
    return None


def _compare_gradients(y, pre64, leaves, leaves64, seed):
    """Gradients of every leaf against eager's. Where a pre-activation lies within rounding of 0, fp64 and the
    tested dtype may take different sides of the ReLU: the reference takes the tested call's side there."""
    generator = torch.Generator().manual_seed(seed + 1)
    grad = torch.randn(y.shape, generator=generator).to(dtype=y.dtype, device=DEVICE)
    grads = torch.autograd.grad(y, list(leaves.values()), grad)
    near_zero = pre64.detach().abs() <= TOLERANCES[y.dtype].atol
    keep = torch.where(near_zero, y.detach() > 0, pre64.detach() > 0)
    ref_grads = torch.autograd.grad(torch.where(keep, pre64, 0.0), list(leaves64.values()), grad.double())
    for name, g, ref in zip(leaves, grads, ref_grads):
        assert g.dtype == leaves[name].dtype, f"grad of {name}: dtype {g.dtype} != {leaves[name].dtype}"
        assert_close(g, ref, f"grad of {name}")


def _check_batch_norm(case, call):
    tensors = _build(case)
    refused = _refused_by_contract(tensors, case)
    try:
        _eager(tensors, case)
        eager_error = None
    except Exception as error:  # whatever eager raises, fusedres must raise too
        eager_error = error
    leaves = _differentiable(tensors)
    arguments = {**tensors, **leaves}
    before = _snapshot(arguments)
    if refused or eager_error is not None:
        event("refused by contract" if refused else f"both raise: {type(eager_error).__name__}")
        with pytest.raises(ValueError if refused else Exception, match=refused):
            call(arguments, case)
        _assert_unchanged(arguments, before)
        return
    event("compared with eager" if tensors["input"].numel() else "compared with eager (empty)")
    pre64, copies64, leaves64 = _eager(tensors, case, dtype=torch.float64)
    y = call(arguments, case)
    x, r = tensors["input"], tensors["residual"]
    assert y.dtype == (x.dtype if r is None else torch.promote_types(x.dtype, r.dtype)), "dtype differs from eager's"
    # The batch-norm computes in the input's precision; a wider residual only widens the output dtype.
    assert_close(y, torch.relu(pre64), "output", dtype=x.dtype)
    for name in ("running_mean", "running_var"):
        if tensors[name] is not None:
            assert_close(arguments[name], copies64[name], name, dtype=tensors[name].dtype)
    if y.numel() and leaves:
        _compare_gradients(y, pre64, {k: arguments[k] for k in leaves}, leaves64, case["seed"])


def _call_functional(arguments, case):
    args = (arguments["running_mean"], arguments["running_var"], arguments["weight"], arguments["bias"],
            case["training"], case["momentum"], case["eps"])
    if arguments["residual"] is None:
        return FF.batch_norm_relu(arguments["input"], *args)
    return FF.batch_norm_add_relu(arguments["input"], arguments["residual"], *args)


@given(batch_norm_cases())
def test_batch_norm_functions_match_eager(case):
    _check_batch_norm(case, _call_functional)


@given(batch_norm_cases())
def test_batch_norm_relu_module_matches_eager(case):
    """BatchNormReLU2d with the case's statistics and parameters loaded into its own (contiguous) state."""
    case = dict(case, layout=case["layout"], weight="contiguous" if case["weight"] else None,
                bias="contiguous" if case["weight"] else None)
    tensors = _build(case)
    c = case["shape"][1]
    affine, tracking = case["weight"] is not None, case["running"] is not None
    module = fusedres.BatchNormReLU2d(c, eps=case["eps"], momentum=case["momentum"], affine=affine,
                                      track_running_stats=tracking, device=DEVICE, dtype=case["param_dtype"])
    reference = torch.nn.BatchNorm2d(c, eps=case["eps"], momentum=case["momentum"], affine=affine,
                                     track_running_stats=tracking, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(module, name) is not None and tensors[name] is not None:
                getattr(module, name).copy_(tensors[name])
                getattr(reference, name).copy_(tensors[name].double())
    module.train(case["training"])
    reference.train(case["training"])
    x = tensors["input"].detach().requires_grad_()
    residual = None if tensors["residual"] is None else tensors["residual"].detach().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    r64 = None if residual is None else residual.detach().double().requires_grad_()
    try:
        y64 = reference(x64)
        y64 = torch.relu(y64 if r64 is None else y64 + r64)
        eager_error = None
    except Exception as error:  # whatever eager raises, fusedres must raise too
        eager_error = error
    state_before = {k: v.clone() for k, v in module.state_dict().items()}
    if eager_error is not None:
        with pytest.raises(Exception):
            module(x, residual)
        for k, v in module.state_dict().items():
            assert torch.equal(v, state_before[k]), f"{k} was modified by a call that raised"
        return
    y = module(x, residual)
    assert_close(y, y64, "output", dtype=x.dtype)  # a wider residual only widens the output dtype
    for name, buffer in module.named_buffers():
        ref = getattr(reference, name)
        if buffer.dtype.is_floating_point:
            assert_close(buffer, ref, name, dtype=buffer.dtype)
        else:
            assert torch.equal(buffer, ref), name


@st.composite
def add_relu_cases(draw):
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=4)))
    return dict(shape=shape, dtype=draw(st.sampled_from(DTYPES)), residual_dtype=draw(st.sampled_from(DTYPES)),
                transposed=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


@given(add_relu_cases())
def test_add_relu_matches_eager(case):
    generator = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(case["shape"], generator=generator).to(case["dtype"])
    r = torch.randn(case["shape"], generator=generator).to(case["residual_dtype"])
    if case["transposed"] and x.dim() >= 2:
        r = r.transpose(0, -1).contiguous().transpose(0, -1)  # another memory layout, same shape
    x, r = x.to(DEVICE).requires_grad_(), r.to(DEVICE).requires_grad_()
    x64, r64 = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    y = FF.add_relu(x, r)
    y64 = torch.relu(x64 + r64)
    assert y.dtype == torch.promote_types(x.dtype, r.dtype)
    assert y.stride() == torch.relu(x.detach() + r.detach()).stride()
    assert_close(y, y64, "output")
    if y.numel():
        _compare_gradients(y, x64 + r64, {"input": x, "residual": r}, {"input": x64, "residual": r64}, case["seed"])
