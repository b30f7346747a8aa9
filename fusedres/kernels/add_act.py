"""Residual add + activation, forward and backward, and their launchers.

Bytes per element moved (e = element size): forward reads x and residual, writes y: 3e; backward reads dy and
the output y (the ReLU family: its derivative is read from y) or x and the residual (the others: the
pre-activation is their sum), writes dz, which is the gradient of both summands: 3e, or 4e.

The tensors of one launch share one dense layout (the op layer arranges that), so the kernels walk them as flat
arrays, whatever that layout is.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import walk
from .activations import DERIVATIVE_FROM_OUTPUT, activation_grad, apply_activation, checked_activation
from .walk import accumulator_dtype, from_fp32_parts, is_dense, launch, needs_int64, scalar_args


@triton.jit
def _add_act_kernel(x_ptr, residual_ptr, y_ptr, numel, slope, ACTIVATION: tl.constexpr,
                    ACC: tl.constexpr, BLOCK: tl.constexpr, INT64: tl.constexpr):
    """y = act(x + residual); ``slope`` (leaky_relu's) as two fp32 parts."""
    start = tl.program_id(0)
    if INT64:
        start = start.to(tl.int64)
    offs = start * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) + tl.load(residual_ptr + offs, mask=mask,
                                                                      other=0.0).to(ACC)
    y = apply_activation(z, from_fp32_parts(slope, ACC), ACTIVATION)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act_backward_kernel(grad_y_ptr, first_ptr, second_ptr, grad_z_ptr, numel, slope,
                         ACTIVATION: tl.constexpr, FROM_OUTPUT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                         INT64: tl.constexpr):
    """dz = dy * act'(z): z is ``first`` (the output y, FROM_OUTPUT: the ReLU family) or ``first + second``
    (the two summands). Computed in the accumulator dtype (the interpreter compares raw bf16 wrongly)."""
    start = tl.program_id(0)
    if INT64:
        start = start.to(tl.int64)
    offs = start * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dy = tl.load(grad_y_ptr + offs, mask=mask, other=0.0).to(ACC)
    z = tl.load(first_ptr + offs, mask=mask, other=0.0).to(ACC)
    if not FROM_OUTPUT:
        z += tl.load(second_ptr + offs, mask=mask, other=0.0).to(ACC)
    dz = activation_grad(dy, z, from_fp32_parts(slope, ACC), ACTIVATION)
    tl.store(grad_z_ptr + offs, dz.to(grad_z_ptr.dtype.element_ty), mask=mask)


def _check_same_dense_layout(name: str, *tensors: torch.Tensor | None) -> None:
    tensors = [t for t in tensors if t is not None]
    first = tensors[0]
    if not is_dense(first) or any(t.stride() != first.stride() for t in tensors):
        raise ValueError(f"fusedres kernels: {name} expects tensors sharing one dense layout, got strides "
                         f"{[tuple(t.stride()) for t in tensors]}")


def add_act_forward(x, residual, out, *, activation: str = "relu", slope: float = 0.0,
                    block: int | None = None) -> None:
    """out = act(x + residual); all three share one dense layout."""
    _check_same_dense_layout("add_act_forward", x, residual, out)
    block = block or walk.CONSTANTS.flat_block
    if x.numel() == 0:
        return
    launch(_add_act_kernel, (triton.cdiv(x.numel(), block),), dict(
        x_ptr=x, residual_ptr=residual, y_ptr=out, numel=x.numel(), **scalar_args(slope=slope),
        ACTIVATION=checked_activation(activation), ACC=accumulator_dtype(out.dtype), BLOCK=block,
        INT64=needs_int64(x, residual, out)), walk.CONSTANTS.small_num_warps)


def act_backward(grad_y, first, second, out, *, activation: str = "relu", slope: float = 0.0,
                 block: int | None = None) -> None:
    """out = grad_y * act'(z), z = ``first`` when ``second`` is None (then ``first`` is the output and the
    activation of the ReLU family), else ``first + second``; all share one dense layout."""
    activation = checked_activation(activation)
    if second is None and activation not in DERIVATIVE_FROM_OUTPUT:
        raise ValueError(f"fusedres kernels: {activation}'s derivative cannot be read from its output")
    _check_same_dense_layout("act_backward", grad_y, first, second, out)
    block = block or walk.CONSTANTS.flat_block
    if out.numel() == 0:
        return
    launch(_act_backward_kernel, (triton.cdiv(out.numel(), block),), dict(
        grad_y_ptr=grad_y, first_ptr=first, second_ptr=second, grad_z_ptr=out, numel=out.numel(),
        **scalar_args(slope=slope),
        ACTIVATION=activation, FROM_OUTPUT=second is None,
        ACC=accumulator_dtype(torch.promote_types(grad_y.dtype, first.dtype)), BLOCK=block,
        INT64=needs_int64(grad_y, first, second, out)), walk.CONSTANTS.small_num_warps)
