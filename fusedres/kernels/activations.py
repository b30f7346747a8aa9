"""The kernels' formulas of the activations in ``fusedres/activations.py``'s table (the names, and which take their
derivative from the output, live there), and their derivatives, each computed as eager PyTorch computes it (the
same formula, in the accumulator dtype), so that results, NaN and Inf, and the derivative at ties match
``torch.autograd`` on the eager expression.

``ACTIVATION`` is a constexpr string naming one of ``ACTIVATIONS``; ``slope`` is leaky_relu's negative slope (a
runtime argument, ignored by the others).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..activations import ACTIVATIONS, DERIVATIVE_FROM_OUTPUT

__all__ = ["ACTIVATIONS", "DERIVATIVE_FROM_OUTPUT", "apply_activation", "activation_grad", "checked_activation"]


def checked_activation(name: str) -> str:
    """``name`` if the kernels have a formula for it (a clear error for the launchers' callers otherwise)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"fusedres kernels: unknown activation {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return name

# The constants are written in the formulas: the GPU compiler refuses a plain global, and the interpreter
# mishandles a constexpr global on the left of an operator. 0.7071067811865476 = 1 / sqrt(2),
# 0.3989422804014327 = 1 / sqrt(2 pi), 0.7978845608028654 = sqrt(2 / pi), 0.044715: the tanh approximation's.


@triton.jit
def _tanh(z):
    # libdevice is not available everywhere (the interpreter): tanh through exp, stable for both signs. Near 0
    # (1 - e) cancels; gelu_tanh adds 1 to it, where that does not show, and mish takes _mish_parts instead.
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def _mish_parts(z):
    """tanh(softplus(z)) and sigmoid(z) from one exp, accurate in the far-negative tail where all three are about
    exp(z) (eager's log1p form keeps it; log(1 + exp(z)) would give 0 there, and (1 - e) / (1 + e) would cancel
    below softplus 0.01)."""
    # softplus = log1p(u), u = exp(z), as log(w) * u / (w - 1), w = 1 + u (Goldberg's form); above 20 it is z
    # (exp may overflow), where its tanh is 1, as in eager; sigmoid = u / w.
    u = tl.exp(z)
    w = 1.0 + u
    large = z > 20.0
    softplus = tl.where(large, z, tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0))))
    # below 0.01, tanh's series to the fifth power (next term: 17 s^7 / 315, 5e-14 relative there)
    s2 = softplus * softplus
    series = softplus * (1.0 - s2 * (0.3333333333333333 - s2 * 0.13333333333333333))
    return tl.where(softplus < 0.01, series, _tanh(softplus)), tl.where(large, 1.0, u / w)


@triton.jit
def apply_activation(z, slope, ACTIVATION: tl.constexpr):
    """act(z). NaN stays NaN, as in eager (tl.maximum(z, 0) would make it 0)."""
    if ACTIVATION == "identity":
        out = z
    elif ACTIVATION == "relu":
        out = tl.where(z < 0, 0.0, z)
    elif ACTIVATION == "relu6":
        out = tl.where(z < 0, 0.0, tl.where(z > 6.0, 6.0, z))
    elif ACTIVATION == "leaky_relu":
        out = tl.where(z > 0, z, z * slope)
    elif ACTIVATION == "silu":
        out = z / (1.0 + tl.exp(-z))
    elif ACTIVATION == "gelu":
        out = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        out = 0.5 * z * (1.0 + _tanh((z + z * z * z * 0.044715) * 0.7978845608028654))
    elif ACTIVATION == "hardswish":
        out = z * tl.where(z + 3.0 < 0, 0.0, tl.where(z + 3.0 > 6.0, 6.0, z + 3.0)) / 6.0
    else:
        tl.static_assert(ACTIVATION == "mish", "unknown activation")
        tanh_softplus, _sigmoid = _mish_parts(z)
        out = z * tanh_softplus
    return out


@triton.jit
def activation_grad(dy, z, slope, ACTIVATION: tl.constexpr):
    """dy * act'(z), as eager's backward formula for the activation computes it (PyTorch's CPU kernels, the tests'
    reference), at ties and NaN too: relu'(0) = 0, relu6'(0) = relu6'(6) = 0, hardswish'(-3) = 0 and (3) = 1,
    leaky_relu'(0) = slope; at a NaN relu passes dy through (eager tests z <= 0, false), relu6 gives 0 and
    hardswish NaN."""
    if ACTIVATION == "identity":
        grad = dy
    elif ACTIVATION == "relu":  # threshold_backward: a NaN passes the gradient through, as in eager
        grad = tl.where(z <= 0, 0.0, dy)
    elif ACTIVATION == "relu6":  # hardtanh_backward: 0 at a NaN
        grad = tl.where((z > 0) & (z < 6.0), dy, 0.0)
    elif ACTIVATION == "leaky_relu":
        grad = tl.where(z > 0, dy, dy * slope)
    elif ACTIVATION == "silu":
        sigmoid = 1.0 / (1.0 + tl.exp(-z))
        grad = dy * sigmoid * (1.0 + z * (1.0 - sigmoid))
    elif ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        grad = dy * (cdf + z * pdf)
    elif ACTIVATION == "gelu_tanh":
        inner_tanh = _tanh((z + z * z * z * 0.044715) * 0.7978845608028654)
        left_derivative = 0.5 * (1.0 + inner_tanh)
        right_derivative = 0.5 * z * (1.0 - inner_tanh * inner_tanh) * 0.7978845608028654 * (1.0 + z * z * 0.134145)
        grad = dy * (left_derivative + right_derivative)
    elif ACTIVATION == "hardswish":
        grad = tl.where(z >= 3.0, dy, tl.where(z <= -3.0, 0.0, dy * (z / 3.0 + 0.5)))  # NaN at a NaN
    else:
        tl.static_assert(ACTIVATION == "mish", "unknown activation")
        tanh_softplus, sigmoid = _mish_parts(z)
        grad = dy * (tanh_softplus + z * sigmoid * (1.0 - tanh_softplus * tanh_softplus))
    return grad
