"""Shared test helpers: the device under test, the tolerance table, reference computations and comparisons."""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from fusedres.modules import is_frozen_batch_norm

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cuda") if torch.cuda.is_available() and not INTERPRETING else torch.device("cpu")
HALF_DTYPES = (torch.float16, torch.bfloat16)
# The --full tier (conftest.py): a test, or a parameter (pytest.param(..., marks=FULL)), that runs only there.
FULL = pytest.mark.full
FULL_TIER = os.environ.get("FUSEDRES_TEST_TIER") == "full"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float


# One table for the whole suite: the dtype of the tensor compared -> tolerance against an fp64 reference.
# Half types: about one ulp (2**-10 for fp16, 2**-7 for bf16): the result's own rounding to nearest (the
# interpreter rounds bf16 as the GPU does: fusedres/kernels/_interpreter.py) plus what fp32 arithmetic adds.
# Never scaled by the reduction size.
TOLERANCES = {
    torch.float64: Tolerance(rtol=1e-9, atol=1e-9),
    torch.float32: Tolerance(rtol=2e-5, atol=2e-5),
    torch.float16: Tolerance(rtol=2e-3, atol=2e-3),
    torch.bfloat16: Tolerance(rtol=8e-3, atol=8e-3),
}


# Whole models in fp64: rounding compounds over dozens of batch-norms, some with only a few values per channel
# (ResNet's last stage on small test images), so agreement is looser than one op's; still far below any fp32 error.
MODEL_TOLERANCE = Tolerance(rtol=1e-6, atol=1e-6)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, dtype: torch.dtype | None = None,
                 tolerance: Tolerance | None = None):
    """Compare ``actual`` with the fp64 reference ``expected`` under the tolerance of ``dtype`` (default:
    actual's dtype); on failure, report the worst element. NaN must match NaN, Inf must match Inf."""
    tol = tolerance or TOLERANCES[dtype or actual.dtype]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    same_nan = torch.isnan(a) == torch.isnan(e)
    assert same_nan.all(), f"{what}: NaN at {(~same_nan).nonzero()[0].tolist()} differs from the reference"
    finite = torch.isfinite(e)
    assert torch.equal(a[~finite & ~torch.isnan(e)], e[~finite & ~torch.isnan(e)]), f"{what}: Inf mismatch"
    a, e = a[finite], e[finite]
    if a.numel() == 0:
        return
    excess = (a - e).abs() - (tol.atol + tol.rtol * e.abs())
    worst = int(excess.argmax())
    assert excess[worst] <= 0, (f"{what}: worst element {a[worst].item():.8g} vs reference {e[worst].item():.8g} "
                                f"(|diff| {abs(a[worst] - e[worst]).item():.3g}, rtol {tol.rtol}, atol {tol.atol})")


def make_input(shape, dtype, channels_last=False, scale=2.0, shift=0.5, generator=None):
    """Fresh random input, never zeros: a nonzero mean and a non-unit spread per channel. ``channels_last``: dense
    in the order (N, spatial..., C), for any rank (torch.channels_last for 4-D, channels_last_3d for 5-D)."""
    x = torch.randn(shape, dtype=torch.float32, generator=generator) * scale + shift
    x = x.to(dtype=dtype, device=DEVICE)
    return channels_last_style(x) if channels_last else x


def channels_last_style(x: torch.Tensor) -> torch.Tensor:
    """``x`` dense in the order (N, spatial..., C), whatever its rank."""
    order = (0, *range(2, x.dim()), 1)
    return x.permute(order).contiguous().permute(sorted(range(x.dim()), key=order.__getitem__))


def make_params(channels, dtype, *, affine=True, buffers=True):
    """(running_mean, running_var, weight, bias): fresh random values, None where not asked for."""
    rm = (torch.randn(channels) * 0.5).to(dtype=dtype, device=DEVICE) if buffers else None
    rv = (torch.rand(channels) + 0.5).to(dtype=dtype, device=DEVICE) if buffers else None
    w = (torch.randn(channels) * 0.8 + 1.0).to(dtype=dtype, device=DEVICE) if affine else None
    b = (torch.randn(channels) * 0.5).to(dtype=dtype, device=DEVICE) if affine else None
    return rm, rv, w, b


def fp64_copy(t, requires_grad=False):
    if t is None:
        return None
    return t.detach().double().requires_grad_(requires_grad)


# The eager expression of each activation name: the tests' own table (fusedres.ops has its own; a mix-up there
# must not be mirrored here).
REFERENCE_ACTIVATIONS = {
    "identity": lambda z, slope: z,
    "relu": lambda z, slope: torch.relu(z),
    "relu6": lambda z, slope: torch.nn.functional.hardtanh(z, 0.0, 6.0),
    "leaky_relu": lambda z, slope: torch.nn.functional.leaky_relu(z, slope),
    "silu": lambda z, slope: z * torch.sigmoid(z),
    "gelu": lambda z, slope: torch.nn.functional.gelu(z, approximate="none"),
    "gelu_tanh": lambda z, slope: torch.nn.functional.gelu(z, approximate="tanh"),
    "hardswish": lambda z, slope: torch.nn.functional.hardswish(z),
    "mish": lambda z, slope: z * torch.tanh(torch.nn.functional.softplus(z)),
}


# Where eager's own CPU kernels disagree with each other: relu6's and hardswish's derivatives at a NaN are 0 and
# NaN on the vectorised path but pass the gradient through on the strided one (PyTorch 2.14), so a test cannot hold
# fusedres (which follows the vectorised path) to one of them there.
NAN_DERIVATIVE_DEPENDS_ON_LAYOUT = ("relu6", "hardswish")


def reference_batch_norm_act(x, residual, rm, rv, w, b, training, momentum=0.1, eps=1e-5, activation="relu",
                             slope=0.01, derivative_dtype=None):
    """Eager PyTorch: act(F.batch_norm(x) [+ residual]); running stats updated in place.

    ``derivative_dtype``: the activation's derivative is taken at the pre-activation rounded to this dtype (its
    value passes through unrounded to the gradient), as any implementation in that precision takes it: eager's
    half-precision ops round the pre-activation before the activation, fusedres reads the ReLU family's derivative
    from its saved half-precision output. Without it, a pre-activation within rounding of a kink (relu6's 6) flips
    the mask against the fp64 reference for eager and fusedres alike."""
    y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    z = y if residual is None else y + residual
    if derivative_dtype is not None:
        z = z + (z.to(derivative_dtype).to(z.dtype) - z).detach()
    return REFERENCE_ACTIVATIONS[activation](z, slope)


def randomize_batch_norms(model: torch.nn.Module, generator: torch.Generator | None = None) -> torch.nn.Module:
    """Give every batch-norm random affine parameters and running statistics, so that no fused site is an
    identity in eval mode."""
    with torch.no_grad():
        for module in model.modules():
            if is_frozen_batch_norm(module):  # torchvision's, timm's or fusedres's: every tensor is a buffer
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.3)
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.3)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                if module.weight is not None:
                    module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                if module.bias is not None:  # (None: affine=False, or bias=False)
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.3)
                if module.track_running_stats:
                    module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.3)
                    module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return model


def assert_within_eager_noise(fused: dict, eager: dict, perturbed: dict, what: str, factor: float = 100.0,
                              floor: float = 1e-12) -> None:
    """Whole models trained a step on small test images: their last stages hold one or two values per channel per
    sample, where batch-norm's backward amplifies rounding by many orders of magnitude. So fused is held to the
    yardstick of eager's own sensitivity: eager rerun on an input perturbed at the last bits (``perturbed``) moves
    each tensor by some amount; fused may differ from eager by at most ``factor`` times that (plus ``floor`` of the
    tensor's scale). ``fused``, ``eager``, ``perturbed``: name -> tensor."""
    for name, expected in eager.items():
        e = expected.detach().double().cpu()
        a, p = fused[name].detach().double().cpu(), perturbed[name].detach().double().cpu()
        assert a.shape == e.shape, f"{what}: {name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        if not e.numel():
            continue
        noise, error = float((p - e).abs().max()), float((a - e).abs().max())
        bound = factor * noise + floor * max(1.0, float(e.abs().max()))
        assert error <= bound, (f"{what}: {name}: differs from eager by {error:.3g}; eager's own sensitivity "
                                f"{noise:.3g} allows {bound:.3g}")


def assert_models_match(fused: torch.nn.Module, reference: torch.nn.Module, what: str,
                        tolerance: Tolerance | None = None) -> None:
    """Every parameter's gradient and every buffer of ``fused`` against ``reference`` (the same structure)."""
    fused_params, ref_params = dict(fused.named_parameters()), dict(reference.named_parameters())
    assert fused_params.keys() == ref_params.keys()
    for name, param in fused_params.items():
        if ref_params[name].grad is not None:
            assert_close(param.grad, ref_params[name].grad, f"{what}: grad of {name}", tolerance=tolerance)
        assert_close(param, ref_params[name], f"{what}: {name}", tolerance=tolerance)
    ref_buffers = dict(reference.named_buffers())
    for name, buffer in fused.named_buffers():
        if buffer.dtype.is_floating_point:
            assert_close(buffer, ref_buffers[name], f"{what}: {name}", tolerance=tolerance)
        else:
            assert torch.equal(buffer, ref_buffers[name]), f"{what}: {name}"


def training_inputs(shape, dtype, channels_last, residual):
    """(x, residual or None, running_mean, running_var, weight, bias) for a training step, the per-channel tensors in
    fp32 for half inputs (autocast's), x, residual, weight and bias requiring grad."""
    x = make_input(shape, dtype, channels_last).requires_grad_()
    r = make_input(shape, dtype, channels_last).requires_grad_() if residual else None
    param_dtype = torch.float32 if dtype in HALF_DTYPES else dtype
    rm, rv, w, b = make_params(shape[1], param_dtype)
    return x, r, rm, rv, w.requires_grad_(), b.requires_grad_()


def training_step(x, r, rm, rv, w, b, grad):
    """relu(bn(x) [+ r]) in training mode and its gradients: (output, grad of x [, of r], of weight, of bias)."""
    import fusedres.functional as FF

    y = FF.batch_norm_add_relu(x, r, rm, rv, w, b, training=True) if r is not None else \
        FF.batch_norm_relu(x, rm, rv, w, b, training=True)
    leaves = [t for t in (x, r, w, b) if t is not None]
    return (y, *torch.autograd.grad(y, leaves, grad))
