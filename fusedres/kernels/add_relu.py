"""Residual add + ReLU, forward and backward, and their launchers.

Bytes per element moved (e = element size): forward reads x and residual, writes y: 3e; backward reads dy and
y, writes dz, which is the gradient of both summands: 3e.

The tensors of one launch share one dense layout (the op layer arranges that), so the kernels walk them as flat
arrays, whatever that layout is.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch
from ._launch import accumulator_dtype, is_dense, launch, needs_int64


@triton.jit
def _add_relu_kernel(x_ptr, residual_ptr, y_ptr, numel, ACC: tl.constexpr, BLOCK: tl.constexpr,
                     INT64: tl.constexpr):
    """y = relu(x + residual); NaN propagates as in torch.relu."""
    start = tl.program_id(0)
    if INT64:
        start = start.to(tl.int64)
    offs = start * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) + tl.load(residual_ptr + offs, mask=mask,
                                                                      other=0.0).to(ACC)
    tl.store(y_ptr + offs, tl.where(z < 0, 0.0, z).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _relu_backward_kernel(grad_y_ptr, y_ptr, grad_z_ptr, numel, BLOCK: tl.constexpr, INT64: tl.constexpr):
    """dz = dy where y > 0, else 0 (torch's threshold_backward on the saved output)."""
    start = tl.program_id(0)
    if INT64:
        start = start.to(tl.int64)
    offs = start * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dy = tl.load(grad_y_ptr + offs, mask=mask, other=0.0)
    # (compared in fp32: the interpreter compares raw bf16 wrongly)
    keep = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32) > 0
    tl.store(grad_z_ptr + offs, tl.where(keep, dy, 0.0).to(grad_z_ptr.dtype.element_ty), mask=mask)


def _check_same_dense_layout(name: str, *tensors: torch.Tensor) -> None:
    first = tensors[0]
    if not is_dense(first) or any(t.stride() != first.stride() for t in tensors):
        raise ValueError(f"fusedres kernels: {name} expects tensors sharing one dense layout, got strides "
                         f"{[tuple(t.stride()) for t in tensors]}")


def add_relu_forward(x, residual, out, *, block: int | None = None) -> None:
    """out = relu(x + residual); all three share one dense layout."""
    _check_same_dense_layout("add_relu_forward", x, residual, out)
    block = block or _launch.CONSTANTS.flat_block
    if x.numel() == 0:
        return
    launch(_add_relu_kernel, (triton.cdiv(x.numel(), block),), dict(
        x_ptr=x, residual_ptr=residual, y_ptr=out, numel=x.numel(), ACC=accumulator_dtype(out.dtype),
        BLOCK=block, INT64=needs_int64(x, residual, out)), 4)


def relu_backward(grad_y, y, out, *, block: int | None = None) -> None:
    """out = grad_y * (y > 0); all three share one dense layout."""
    _check_same_dense_layout("relu_backward", grad_y, y, out)
    block = block or _launch.CONSTANTS.flat_block
    if y.numel() == 0:
        return
    launch(_relu_backward_kernel, (triton.cdiv(y.numel(), block),), dict(
        grad_y_ptr=grad_y, y_ptr=y, grad_z_ptr=out, numel=y.numel(), BLOCK=block,
        INT64=needs_int64(grad_y, y, out)), 4)
