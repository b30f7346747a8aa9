"""The activations the kernels fuse after a batch-norm (or an add), and their derivatives, each computed as eager
PyTorch computes it (the same formula, in the accumulator dtype), so that results, NaN and Inf, and the
derivative at ties match ``torch.autograd`` on the eager expression.

``ACTIVATION`` is a constexpr string naming one of ``ACTIVATIONS``; ``slope`` is leaky_relu's negative slope (a
runtime argument, ignored by the others).
"""
from __future__ import annotations

import triton
import triton.language as tl

ACTIVATIONS = ("identity", "relu", "relu6", "leaky_relu", "silu", "gelu", "gelu_tanh", "hardswish", "mish")
# Activations whose derivative can be read from their output (y > 0, or 0 < y < 6): with a residual, the
# backward reads the saved output instead of recomputing the pre-activation from the input and the residual.
DERIVATIVE_FROM_OUTPUT = ("relu", "relu6")

# The constants are written in the formulas: the GPU compiler refuses a plain global, and the interpreter
# mishandles a constexpr global on the left of an operator. 0.7071067811865476 = 1 / sqrt(2),
# 0.3989422804014327 = 1 / sqrt(2 pi), 0.7978845608028654 = sqrt(2 / pi), 0.044715: the tanh approximation's.


@triton.jit
def _tanh(z):
    # libdevice is not available everywhere (the interpreter): tanh through exp, stable for both signs.
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def _softplus(z):
    # log1p(exp(z)) as torch.nn.functional.mish computes it; exp overflows to inf and log(inf) is inf, as there.
    return tl.log(1.0 + tl.exp(z))


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
        out = z * _tanh(_softplus(z))
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
        sigmoid = 1.0 / (1.0 + tl.exp(-z))
        tanh_softplus = _tanh(_softplus(z))
        grad = dy * (tanh_softplus + z * sigmoid * (1.0 - tanh_softplus * tanh_softplus))
    return grad
