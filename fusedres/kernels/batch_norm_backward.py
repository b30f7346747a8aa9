"""The backward's kernels: the reduce pass (dz, and the per-channel sums merged by the last program; in eval mode dx
itself) and the dx pass. Their launchers are ``batch_norm.py``'s; arguments as in
``batch_norm_forward.py``."""
from __future__ import annotations

import triton
import triton.language as tl

from .activations import activation_grad
from .tiles import (channel_affine, channel_block, chunk_tile, last_to_finish, load_tile, merge_sums, normalized,
                    split_chunks, store_tile)
from .walk import from_fp32_parts

# ----------------------------------------------------------------------------------------------------------
# Backward. For y = act(z), z = xhat * w + b [+ r], xhat = (x - mean) * invstd, per channel over the
# M = N * H * W values of the batch:
#   dz      = dy * act'(z)                              (also the residual's gradient)
#   dbias   = sum(dz),  dweight = sum(dz * xhat)
#   dx      = w * invstd * (dz - sum(dz) / M - xhat * sum(dz * xhat) / M)     batch statistics (training)
#   dx      = w * invstd * dz                                                 frozen statistics: one pass
# act'(z): without a residual, z = (x - mean) * scale + offset is recomputed from x with the forward's own arithmetic
# (channel_affine, normalized), so the backward reads dy and x only. With one, z needs r as well: the ReLU family
# reads its derivative from the saved output instead (y <= 0 exactly where z <= 0; 0 < y < 6 where 0 < z < 6); the
# other activations read r (the block's input, which the next layer saves anyway). The reduce pass then writes dz,
# which the dx pass reads in place of dy: 4e + 3e, where re-reading y or r in the dx pass would also cost 7e. The
# identity needs no z at all: dz is dy.
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def bn_backward_reduce_kernel(
    grad_y_ptr, x_ptr,
    pre_ptr,                     # what the pre-activation needs beyond x: the output y or the residual r
    grad_z_ptr,                  # out (pre's strides): dz, when WRITE_GRAD_Z
    grad_x_ptr,                  # out (x's strides): dx with frozen statistics, when WRITE_GRAD_X
    mean, var, weight, bias, eps, slope,
    partial_ptr,                 # [2, splits, channels] scratch: each split's sum(dz) and sum(dz * xhat)
    ticket_ptr,                  # [channel_blocks] int32 counters: zero on entry, left zero
    sums_ptr,                    # [2, channels] out: sum(dz), sum(dz * xhat) (accumulator dtype)
    grad_weight_ptr, grad_bias_ptr,
    walk, grad_y_strides, x_strides, pre_strides,
    ACTIVATION: tl.constexpr,
    PRE: tl.constexpr,           # where act'(z) comes from: "input" (z from x), "output" (y), "residual" (x and r)
    WRITE_GRAD_Z: tl.constexpr, WRITE_GRAD_X: tl.constexpr,
    MERGE: tl.constexpr,         # the sums are wanted (training, or dweight/dbias): write partials and merge
    WRITE_GRAD_WEIGHT: tl.constexpr, WRITE_GRAD_BIAS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr, SLAB_INNER: tl.constexpr,
    ALIGN: tl.constexpr, INT64: tl.constexpr,
):
    """dz, and per channel sum(dz) and sum(dz * xhat), which are dbias and dweight."""
    c0, offs_c, mask_c = channel_block(walk, BLOCK_C, CHANNELS_LAST, ALIGN)
    scale, offset, mean, invstd = channel_affine(mean, var, weight, bias, eps, offs_c, mask_c, HAS_WEIGHT, HAS_BIAS,
                                                 ACC, INT64)
    sum_dz = tl.zeros([BLOCK_C], dtype=ACC)
    sum_dz_xhat = tl.zeros([BLOCK_C], dtype=ACC)
    first, last = split_chunks(walk)
    for chunk in range(first, last):
        tile = chunk_tile(chunk, walk, c0, offs_c, mask_c, BLOCK_R, CHANNELS_LAST, SLAB_INNER, ALIGN)
        x = load_tile(x_ptr, x_strides, tile, ACC, BLOCK_R, BLOCK_C, CHANNELS_LAST, SLAB_INNER, ALIGN, INT64)
        dy = load_tile(grad_y_ptr, grad_y_strides, tile, ACC, BLOCK_R, BLOCK_C, CHANNELS_LAST, SLAB_INNER, ALIGN,
                       INT64)
        if PRE == "input":
            z = normalized(x, mean, scale, offset)
        else:
            z = load_tile(pre_ptr, pre_strides, tile, ACC, BLOCK_R, BLOCK_C, CHANNELS_LAST, SLAB_INNER, ALIGN, INT64)
            if PRE == "residual":
                z += normalized(x, mean, scale, offset)
        # The derivative taken on the output y works for the ReLU family (see above); dy is 0 where rows or
        # channels do not exist, and so is dz.
        dz = activation_grad(dy, z, from_fp32_parts(slope, ACC), ACTIVATION)
        if WRITE_GRAD_Z:
            store_tile(grad_z_ptr, dz, pre_strides, tile, BLOCK_R, BLOCK_C, CHANNELS_LAST, SLAB_INNER, ALIGN, INT64)
        if WRITE_GRAD_X:
            store_tile(grad_x_ptr, dz * scale[None, :], x_strides, tile, BLOCK_R, BLOCK_C, CHANNELS_LAST,
                       SLAB_INNER, ALIGN, INT64)
        if MERGE:
            sum_dz += tl.sum(dz, axis=0)
            row_mask = tile[2]
            xhat = tl.where(row_mask[:, None], (x - mean[None, :]) * invstd[None, :], 0.0)
            sum_dz_xhat += tl.sum(dz * xhat, axis=0)
    if MERGE:
        channels = walk[0]
        splits = tl.num_programs(1)
        row = tl.program_id(1) * channels + offs_c
        tl.store(partial_ptr + row, sum_dz, mask=mask_c)
        tl.store(partial_ptr + splits * channels + row, sum_dz_xhat, mask=mask_c)
        if last_to_finish(ticket_ptr + tl.program_id(0), splits):
            total_dz, total_dz_xhat = merge_sums(partial_ptr, splits, channels, offs_c, mask_c, ACC, BLOCK_S,
                                                  BLOCK_C)
            tl.store(sums_ptr + offs_c, total_dz, mask=mask_c)
            tl.store(sums_ptr + channels + offs_c, total_dz_xhat, mask=mask_c)
            if WRITE_GRAD_WEIGHT:
                tl.store(grad_weight_ptr + offs_c, total_dz_xhat.to(grad_weight_ptr.dtype.element_ty), mask=mask_c)
            if WRITE_GRAD_BIAS:
                tl.store(grad_bias_ptr + offs_c, total_dz.to(grad_bias_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def bn_backward_dx_kernel(
    grad_ptr,                    # dz, or dy when GRAD_IS_DY (act'(z) then recomputed from x)
    x_ptr, grad_x_ptr,
    mean, var, weight, bias, eps, slope,
    sums_ptr,                    # [2, channels]: sum(dz), sum(dz * xhat), from the reduce pass
    count,                       # M = N * H * W
    walk, grad_strides, x_strides, grad_x_strides,
    ACTIVATION: tl.constexpr, GRAD_IS_DY: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr, SLAB_INNER: tl.constexpr,
    ALIGN: tl.constexpr, INT64: tl.constexpr,
):
    """dx with batch statistics (see the derivation above)."""
    c0, offs_c, mask_c = channel_block(walk, BLOCK_C, CHANNELS_LAST, ALIGN)
    scale, offset, mean, invstd = channel_affine(mean, var, weight, bias, eps, offs_c, mask_c, HAS_WEIGHT, HAS_BIAS,
                                                 ACC, INT64)
    channels = walk[0]
    inv_count = 1.0 / tl.cast(count, ACC)  # in-kernel, so that fp64 keeps fp64 (a float argument is fp32)
    mean_dz = tl.load(sums_ptr + offs_c, mask=mask_c, other=0.0) * inv_count
    mean_dz_xhat = tl.load(sums_ptr + channels + offs_c, mask=mask_c, other=0.0) * inv_count
    first, last = split_chunks(walk)
    for chunk in range(first, last):
        tile = chunk_tile(chunk, walk, c0, offs_c, mask_c, BLOCK_R, CHANNELS_LAST, SLAB_INNER, ALIGN)
        x = load_tile(x_ptr, x_strides, tile, ACC, BLOCK_R, BLOCK_C, CHANNELS_LAST, SLAB_INNER, ALIGN, INT64)
        dz = load_tile(grad_ptr, grad_strides, tile, ACC, BLOCK_R, BLOCK_C, CHANNELS_LAST, SLAB_INNER, ALIGN, INT64)
        if GRAD_IS_DY:
            dz = activation_grad(dz, normalized(x, mean, scale, offset), from_fp32_parts(slope, ACC), ACTIVATION)
        xhat = (x - mean[None, :]) * invstd[None, :]
        dx = (dz - mean_dz[None, :] - xhat * mean_dz_xhat[None, :]) * scale[None, :]
        store_tile(grad_x_ptr, dx, grad_x_strides, tile, BLOCK_R, BLOCK_C, CHANNELS_LAST, SLAB_INNER, ALIGN, INT64)
