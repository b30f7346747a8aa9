"""Batch-norm (+ residual add) + ReLU kernels, forward and backward, and their launchers.

Bytes per element moved (e = element size; DESIGN.md's floors):
  inference / training normalize pass: read x [, residual], write y            2e [3e]
  training statistics pass:            read x                                  1e
  backward reduce pass:                read dy, x [, y], write [dz]            2e [4e]; eval mode also writes dx
  backward dx pass:                    read dy, x (mask recomputed) or dz, x, write dx   3e
Per-channel vectors (mean, var, weight, bias, partial sums) are negligible next to these.

Every kernel walks the tensors as described in ``_launch.py``: program ``(channel block, split)`` visits the
chunks of its split, each a ``[BLOCK_INNER, BLOCK_C]`` tile. Reductions write one partial row per split and a
second kernel merges the rows in a fixed order: no atomics, bitwise deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import ChannelGeometry, TilePlan, accumulator_dtype, fp32_parts, launch, needs_int64, plan_tiles


@triton.jit
def _tile_offsets(chunk, inner_blocks, offs_c, stride_outer, stride_inner, stride_channel,
                  BLOCK_INNER: tl.constexpr, INT64: tl.constexpr):
    """Element offsets of one chunk's tile for a tensor with the given strides."""
    outer_index = chunk // inner_blocks
    rows = (chunk - outer_index * inner_blocks) * BLOCK_INNER + tl.arange(0, BLOCK_INNER)
    if INT64:
        outer_index = outer_index.to(tl.int64)
        rows = rows.to(tl.int64)
        offs_c = offs_c.to(tl.int64)
    return outer_index * stride_outer + rows[:, None] * stride_inner + offs_c[None, :] * stride_channel


@triton.jit
def _tile_mask(chunk, inner, inner_blocks, mask_c, BLOCK_INNER: tl.constexpr):
    outer_index = chunk // inner_blocks
    first_row = (chunk - outer_index * inner_blocks) * BLOCK_INNER
    rows = first_row + tl.arange(0, BLOCK_INNER)
    return (rows < inner)[:, None] & mask_c[None, :], tl.minimum(inner - first_row, BLOCK_INNER)


@triton.jit
def _scalar(value, residue, ACC: tl.constexpr):
    """A float argument passed as two fp32 parts (float arguments are fp32), summed in the accumulator
    dtype: fp64 kernels get the full value."""
    return tl.cast(value, ACC) + tl.cast(residue, ACC)


@triton.jit
def _channel_affine(mean_ptr, var_ptr, weight_ptr, bias_ptr, eps, eps_residue, offs_c, mask_c,
                    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    """Per-channel ``scale, shift, invstd`` such that ``bn(x) = x * scale + shift``.

    The forward and the backward both call this, so the ReLU mask the backward recomputes is bit for bit the
    forward's."""
    mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
    var = tl.load(var_ptr + offs_c, mask=mask_c, other=1.0).to(ACC)
    var_eps = var + _scalar(eps, eps_residue, ACC)
    if ACC == tl.float64:
        invstd = 1.0 / tl.sqrt(var_eps)  # IEEE for fp64; sqrt_rn exists for fp32 only
    else:
        invstd = 1.0 / tl.sqrt_rn(var_eps)
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + offs_c, mask=mask_c, other=1.0).to(ACC)
    shift = -mean * scale
    if HAS_BIAS:
        shift = shift + tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
    return scale, shift, mean, invstd


@triton.jit
def _relu(z):
    # NaN stays NaN, as torch.relu: tl.maximum(z, 0) and tl.where(z > 0, z, 0) would both turn it into 0.
    return tl.where(z < 0, 0.0, z)


@triton.jit
def _bn_act_apply_kernel(
    x_ptr, residual_ptr, y_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, eps, eps_residue,
    channels, inner, inner_blocks, chunks, chunks_per_split,
    x_stride_outer, x_stride_inner, x_stride_channel,
    residual_stride_outer, residual_stride_inner, residual_stride_channel,
    y_stride_outer, y_stride_inner, y_stride_channel,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_INNER: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
):
    """y = relu(x * scale + shift [+ residual]), statistics given (running ones, or the batch's)."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    scale, shift, _mean, _invstd = _channel_affine(mean_ptr, var_ptr, weight_ptr, bias_ptr, eps, eps_residue,
                                                   offs_c, mask_c, HAS_WEIGHT, HAS_BIAS, ACC)
    first = tl.program_id(1) * chunks_per_split
    for chunk in range(first, tl.minimum(first + chunks_per_split, chunks)):
        mask, _rows = _tile_mask(chunk, inner, inner_blocks, mask_c, BLOCK_INNER)
        x_offs = _tile_offsets(chunk, inner_blocks, offs_c, x_stride_outer, x_stride_inner,
                               x_stride_channel, BLOCK_INNER, INT64)
        z = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(ACC) * scale[None, :] + shift[None, :]
        if HAS_RESIDUAL:
            r_offs = _tile_offsets(chunk, inner_blocks, offs_c, residual_stride_outer,
                                   residual_stride_inner, residual_stride_channel, BLOCK_INNER, INT64)
            z += tl.load(residual_ptr + r_offs, mask=mask, other=0.0).to(ACC)
        y_offs = _tile_offsets(chunk, inner_blocks, offs_c, y_stride_outer, y_stride_inner,
                               y_stride_channel, BLOCK_INNER, INT64)
        tl.store(y_ptr + y_offs, _relu(z).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_stats_partial_kernel(
    x_ptr, partial_count_ptr, partial_mean_ptr, partial_m2_ptr,
    channels, inner, inner_blocks, chunks, chunks_per_split,
    x_stride_outer, x_stride_inner, x_stride_channel,
    ACC: tl.constexpr, BLOCK_INNER: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
):
    """Per split and channel: count, mean and sum of squared deviations, merging tiles with Chan's formula."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    count = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    first = tl.program_id(1) * chunks_per_split
    for chunk in range(first, tl.minimum(first + chunks_per_split, chunks)):
        mask, rows = _tile_mask(chunk, inner, inner_blocks, mask_c, BLOCK_INNER)
        offs = _tile_offsets(chunk, inner_blocks, offs_c, x_stride_outer, x_stride_inner,
                             x_stride_channel, BLOCK_INNER, INT64)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        tile_count = rows.to(ACC)
        tile_mean = tl.sum(x, axis=0) / tile_count
        deviation = tl.where(mask, x - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(deviation * deviation, axis=0)
        merged = count + tile_count
        delta = tile_mean - mean
        mean += delta * (tile_count / merged)
        m2 += tile_m2 + delta * delta * (count * tile_count / merged)
        count = merged
    out = tl.program_id(1) * channels + offs_c
    tl.store(partial_count_ptr + out, count, mask=mask_c)
    tl.store(partial_mean_ptr + out, mean, mask=mask_c)
    tl.store(partial_m2_ptr + out, m2, mask=mask_c)


@triton.jit
def _bn_stats_finalize_kernel(
    partial_count_ptr, partial_mean_ptr, partial_m2_ptr, mean_ptr, var_ptr, channels, splits,
    ACC: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merge the splits: mean = sum(n_s mean_s) / n, M2 = sum(M2_s + n_s (mean_s - mean)^2); var = M2 / n.

    Deviations are taken from the merged mean, so no E[x^2] - E[x]^2 cancellation."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    count = tl.zeros([BLOCK_C], dtype=ACC)
    weighted_sum = tl.zeros([BLOCK_C], dtype=ACC)
    for s0 in range(0, splits, BLOCK_SPLITS):
        offs_s = s0 + tl.arange(0, BLOCK_SPLITS)
        mask = (offs_s < splits)[:, None] & mask_c[None, :]
        offs = offs_s[:, None] * channels + offs_c[None, :]
        n = tl.load(partial_count_ptr + offs, mask=mask, other=0.0)
        count += tl.sum(n, axis=0)
        weighted_sum += tl.sum(n * tl.load(partial_mean_ptr + offs, mask=mask, other=0.0), axis=0)
    count = tl.where(mask_c, count, 1.0)  # channels past the end: no 0 / 0
    mean = weighted_sum / count
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for s0 in range(0, splits, BLOCK_SPLITS):
        offs_s = s0 + tl.arange(0, BLOCK_SPLITS)
        mask = (offs_s < splits)[:, None] & mask_c[None, :]
        offs = offs_s[:, None] * channels + offs_c[None, :]
        n = tl.load(partial_count_ptr + offs, mask=mask, other=0.0)
        delta = tl.load(partial_mean_ptr + offs, mask=mask, other=0.0) - mean[None, :]
        m2 += tl.sum(tl.load(partial_m2_ptr + offs, mask=mask, other=0.0) + n * delta * delta, axis=0)
    tl.store(mean_ptr + offs_c, mean, mask=mask_c)
    tl.store(var_ptr + offs_c, m2 / count, mask=mask_c)


@triton.jit
def _update_running_stats_kernel(
    running_mean_ptr, running_var_ptr, mean_ptr, var_ptr, num_batches_tracked_ptr, momentum, momentum_residue, count,
    channels,
    CUMULATIVE: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """running = (1 - f) running + f batch, with the unbiased batch variance; f = momentum, or
    1 / num_batches_tracked (cumulative average), read on the device so there is no host sync."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    if CUMULATIVE:
        factor = 1.0 / tl.load(num_batches_tracked_ptr).to(ACC)
    else:
        factor = _scalar(momentum, momentum_residue, ACC)
    running_mean = tl.load(running_mean_ptr + offs_c, mask=mask_c).to(ACC)
    running_var = tl.load(running_var_ptr + offs_c, mask=mask_c).to(ACC)
    mean = tl.load(mean_ptr + offs_c, mask=mask_c).to(ACC)
    count_acc = tl.cast(count, ACC)
    var = tl.load(var_ptr + offs_c, mask=mask_c).to(ACC) * (count_acc / (count_acc - 1.0))
    running_mean = running_mean + factor * (mean - running_mean)
    running_var = running_var + factor * (var - running_var)
    tl.store(running_mean_ptr + offs_c, running_mean.to(running_mean_ptr.dtype.element_ty), mask=mask_c)
    tl.store(running_var_ptr + offs_c, running_var.to(running_var_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def _bn_act_backward_reduce_kernel(
    grad_y_ptr, x_ptr, y_ptr, grad_z_ptr, grad_x_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr,
    eps, eps_residue, partial_sum_dz_ptr, partial_sum_dz_xhat_ptr,
    channels, inner, inner_blocks, chunks, chunks_per_split,
    grad_y_stride_outer, grad_y_stride_inner, grad_y_stride_channel,
    x_stride_outer, x_stride_inner, x_stride_channel,
    y_stride_outer, y_stride_inner, y_stride_channel,
    MASK_FROM_OUTPUT: tl.constexpr, WRITE_GRAD_Z: tl.constexpr, WRITE_GRAD_X: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_INNER: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
):
    """dz = dy * (pre-activation > 0); per split and channel: sum(dz) and sum(dz * xhat).

    The mask comes from the saved output y when a residual was added (y > 0), else it is recomputed from x.
    dz (the residual's gradient) and dx (frozen statistics: dx = dz * weight * invstd, the whole eval-mode
    backward in this one pass) are written when asked; both have y's strides."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    scale, shift, mean, invstd = _channel_affine(mean_ptr, var_ptr, weight_ptr, bias_ptr, eps, eps_residue,
                                                 offs_c, mask_c, HAS_WEIGHT, HAS_BIAS, ACC)
    sum_dz = tl.zeros([BLOCK_C], dtype=ACC)
    sum_dz_xhat = tl.zeros([BLOCK_C], dtype=ACC)
    first = tl.program_id(1) * chunks_per_split
    for chunk in range(first, tl.minimum(first + chunks_per_split, chunks)):
        mask, _rows = _tile_mask(chunk, inner, inner_blocks, mask_c, BLOCK_INNER)
        x_offs = _tile_offsets(chunk, inner_blocks, offs_c, x_stride_outer, x_stride_inner,
                               x_stride_channel, BLOCK_INNER, INT64)
        dy_offs = _tile_offsets(chunk, inner_blocks, offs_c, grad_y_stride_outer, grad_y_stride_inner,
                                grad_y_stride_channel, BLOCK_INNER, INT64)
        y_offs = _tile_offsets(chunk, inner_blocks, offs_c, y_stride_outer, y_stride_inner,
                               y_stride_channel, BLOCK_INNER, INT64)
        x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(grad_y_ptr + dy_offs, mask=mask, other=0.0).to(ACC)
        if MASK_FROM_OUTPUT:
            keep = tl.load(y_ptr + y_offs, mask=mask, other=0.0).to(ACC) > 0
        else:
            keep = x * scale[None, :] + shift[None, :] > 0
        dz = tl.where(keep & mask, dy, 0.0)
        if WRITE_GRAD_Z:
            tl.store(grad_z_ptr + y_offs, dz.to(grad_z_ptr.dtype.element_ty), mask=mask)
        if WRITE_GRAD_X:
            tl.store(grad_x_ptr + x_offs, (dz * scale[None, :]).to(grad_x_ptr.dtype.element_ty),
                     mask=mask)
        sum_dz += tl.sum(dz, axis=0)
        sum_dz_xhat += tl.sum(dz * ((x - mean[None, :]) * invstd[None, :]), axis=0)
    out = tl.program_id(1) * channels + offs_c
    tl.store(partial_sum_dz_ptr + out, sum_dz, mask=mask_c)
    tl.store(partial_sum_dz_xhat_ptr + out, sum_dz_xhat, mask=mask_c)


@triton.jit
def _bn_backward_finalize_kernel(
    partial_sum_dz_ptr, partial_sum_dz_xhat_ptr, sum_dz_ptr, sum_dz_xhat_ptr, grad_weight_ptr, grad_bias_ptr,
    channels, splits,
    WRITE_GRAD_WEIGHT: tl.constexpr, WRITE_GRAD_BIAS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Sum the splits in a fixed order: sum(dz) is dbias, sum(dz * xhat) is dweight."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    sum_dz = tl.zeros([BLOCK_C], dtype=ACC)
    sum_dz_xhat = tl.zeros([BLOCK_C], dtype=ACC)
    for s0 in range(0, splits, BLOCK_SPLITS):
        offs_s = s0 + tl.arange(0, BLOCK_SPLITS)
        mask = (offs_s < splits)[:, None] & mask_c[None, :]
        offs = offs_s[:, None] * channels + offs_c[None, :]
        sum_dz += tl.sum(tl.load(partial_sum_dz_ptr + offs, mask=mask, other=0.0), axis=0)
        sum_dz_xhat += tl.sum(tl.load(partial_sum_dz_xhat_ptr + offs, mask=mask, other=0.0), axis=0)
    tl.store(sum_dz_ptr + offs_c, sum_dz, mask=mask_c)
    tl.store(sum_dz_xhat_ptr + offs_c, sum_dz_xhat, mask=mask_c)
    if WRITE_GRAD_WEIGHT:
        tl.store(grad_weight_ptr + offs_c, sum_dz_xhat.to(grad_weight_ptr.dtype.element_ty), mask=mask_c)
    if WRITE_GRAD_BIAS:
        tl.store(grad_bias_ptr + offs_c, sum_dz.to(grad_bias_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def _bn_backward_dx_kernel(
    grad_ptr, x_ptr, grad_x_ptr, mean_ptr, var_ptr, weight_ptr, bias_ptr, eps, eps_residue,
    sum_dz_ptr, sum_dz_xhat_ptr, count, channels, inner, inner_blocks, chunks, chunks_per_split,
    grad_stride_outer, grad_stride_inner, grad_stride_channel,
    x_stride_outer, x_stride_inner, x_stride_channel,
    grad_x_stride_outer, grad_x_stride_inner, grad_x_stride_channel,
    GRAD_IS_DY: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_INNER: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
):
    """dx = weight * invstd * (dz - mean(dz) - xhat * mean(dz * xhat)), batch statistics.

    ``grad`` is dz itself, or dy when GRAD_IS_DY, the ReLU mask then recomputed from x as in the forward."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    scale, shift, mean, invstd = _channel_affine(mean_ptr, var_ptr, weight_ptr, bias_ptr, eps, eps_residue,
                                                 offs_c, mask_c, HAS_WEIGHT, HAS_BIAS, ACC)
    inv_count = 1.0 / tl.cast(count, ACC)  # in-kernel, so that fp64 keeps fp64 (a float argument is fp32)
    mean_dz = tl.load(sum_dz_ptr + offs_c, mask=mask_c, other=0.0) * inv_count
    mean_dz_xhat = tl.load(sum_dz_xhat_ptr + offs_c, mask=mask_c, other=0.0) * inv_count
    first = tl.program_id(1) * chunks_per_split
    for chunk in range(first, tl.minimum(first + chunks_per_split, chunks)):
        mask, _rows = _tile_mask(chunk, inner, inner_blocks, mask_c, BLOCK_INNER)
        x_offs = _tile_offsets(chunk, inner_blocks, offs_c, x_stride_outer, x_stride_inner,
                               x_stride_channel, BLOCK_INNER, INT64)
        g_offs = _tile_offsets(chunk, inner_blocks, offs_c, grad_stride_outer, grad_stride_inner,
                               grad_stride_channel, BLOCK_INNER, INT64)
        x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(ACC)
        dz = tl.load(grad_ptr + g_offs, mask=mask, other=0.0).to(ACC)
        if GRAD_IS_DY:
            dz = tl.where(x * scale[None, :] + shift[None, :] > 0, dz, 0.0)
        xhat = (x - mean[None, :]) * invstd[None, :]
        dx = (dz - mean_dz[None, :] - xhat * mean_dz_xhat[None, :]) * scale[None, :]
        dx_offs = _tile_offsets(chunk, inner_blocks, offs_c, grad_x_stride_outer, grad_x_stride_inner,
                                grad_x_stride_channel, BLOCK_INNER, INT64)
        tl.store(grad_x_ptr + dx_offs, dx.to(grad_x_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Launchers. They take their outputs as arguments; only per-launch scratch (the partial rows) is theirs.
# ``block_inner`` / ``block_channels`` override the shape heuristic (tests use small tiles for masks and tails).
# ----------------------------------------------------------------------------------------------------------

_FINALIZE_BLOCK_C = 64
_FINALIZE_BLOCK_SPLITS = 32


def _strides(geometry: ChannelGeometry, t: torch.Tensor | None, name: str) -> tuple[int, int, int]:
    if t is None:
        return (0, 0, 0)
    strides = geometry.strides(t)
    if strides is None:
        raise ValueError(f"fusedres kernels: {name} with strides {tuple(t.stride())} cannot be walked in the "
                         f"input's layout; make it dense in that layout first")
    return strides


def walkable(x: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether the kernels can read ``t`` (same shape as the dense ``x``) through its strides in x's layout."""
    return ChannelGeometry.of(x).strides(t) is not None


def _plan(x: torch.Tensor, **tiles) -> tuple[ChannelGeometry, TilePlan]:
    geometry = ChannelGeometry.of(x)
    return geometry, plan_tiles(geometry, channels_contiguous=geometry.outer == 1, **tiles)


def _walk_args(geometry: ChannelGeometry, plan: TilePlan) -> dict:
    return dict(channels=geometry.channels, inner=geometry.inner, inner_blocks=plan.inner_blocks,
                chunks=plan.chunks, chunks_per_split=plan.chunks_per_split,
                BLOCK_INNER=plan.block_inner, BLOCK_C=plan.block_channels)


def _eps_args(eps: float) -> dict:
    eps, eps_residue = fp32_parts(eps)
    return dict(eps=eps, eps_residue=eps_residue)


def _stride_args(prefix: str, strides: tuple[int, int, int]) -> dict:
    return {f"{prefix}_stride_outer": strides[0], f"{prefix}_stride_inner": strides[1],
            f"{prefix}_stride_channel": strides[2]}


def bn_act_apply(x, residual, mean, var, weight, bias, eps: float, out, **tiles) -> None:
    """out = relu(batch_norm(x; mean, var, weight, bias) [+ residual])."""
    if x.numel() == 0:
        return
    geometry, plan = _plan(x, **tiles)
    launch(_bn_act_apply_kernel, plan.grid, dict(
        x_ptr=x, residual_ptr=residual, y_ptr=out, mean_ptr=mean, var_ptr=var, weight_ptr=weight,
        bias_ptr=bias, **_eps_args(eps), **_walk_args(geometry, plan),
        **_stride_args("x", _strides(geometry, x, "input")),
        **_stride_args("residual", _strides(geometry, residual, "residual")),
        **_stride_args("y", _strides(geometry, out, "output")),
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        # An fp64 residual makes an fp64 output: keep its precision, as eager's fp64 add does.
        ACC=accumulator_dtype(torch.promote_types(x.dtype, out.dtype)), INT64=needs_int64(x, residual, out)),
        plan.num_warps)


def bn_batch_stats(x, mean_out, var_out, **tiles) -> None:
    """mean_out, var_out = per-channel mean and biased variance of x (accumulator dtype)."""
    geometry, plan = _plan(x, **tiles)
    partial = torch.empty((3, plan.splits, geometry.channels), dtype=mean_out.dtype, device=x.device)
    launch(_bn_stats_partial_kernel, plan.grid, dict(
        x_ptr=x, partial_count_ptr=partial[0], partial_mean_ptr=partial[1], partial_m2_ptr=partial[2],
        **_walk_args(geometry, plan), **_stride_args("x", _strides(geometry, x, "input")),
        ACC=accumulator_dtype(x.dtype), INT64=needs_int64(x)), plan.num_warps)
    launch(_bn_stats_finalize_kernel, (triton.cdiv(geometry.channels, _FINALIZE_BLOCK_C),), dict(
        partial_count_ptr=partial[0], partial_mean_ptr=partial[1], partial_m2_ptr=partial[2],
        mean_ptr=mean_out, var_ptr=var_out, channels=geometry.channels, splits=plan.splits,
        ACC=accumulator_dtype(x.dtype), BLOCK_SPLITS=_FINALIZE_BLOCK_SPLITS, BLOCK_C=_FINALIZE_BLOCK_C), 4)


def update_running_stats(running_mean, running_var, mean, var, momentum: float, count: int,
                         num_batches_tracked=None) -> None:
    """In place: running statistics moved toward the batch's (unbiased variance). With
    ``num_batches_tracked`` the factor is ``1 / num_batches_tracked`` (momentum=None), read on the device."""
    channels = running_mean.numel()
    if channels == 0:
        return
    launch(_update_running_stats_kernel, (triton.cdiv(channels, _FINALIZE_BLOCK_C),), dict(
        running_mean_ptr=running_mean, running_var_ptr=running_var, mean_ptr=mean, var_ptr=var,
        num_batches_tracked_ptr=num_batches_tracked,
        **dict(zip(("momentum", "momentum_residue"), fp32_parts(momentum))),
        count=count, channels=channels,
        CUMULATIVE=num_batches_tracked is not None, ACC=accumulator_dtype(mean.dtype),
        BLOCK_C=_FINALIZE_BLOCK_C), 4)


def bn_act_backward_reduce(grad_y, x, y, mean, var, weight, bias, eps: float, *, sum_dz_out, sum_dz_xhat_out,
                           grad_z_out=None, grad_x_out=None, grad_weight_out=None, grad_bias_out=None,
                           **tiles) -> None:
    """sum(dz) and sum(dz * xhat) per channel, dz = grad_y * relu'(pre-activation).

    ``y`` given: the mask is ``y > 0`` (a residual was added); else it is recomputed from x. Optionally writes
    dz (``grad_z_out``, y's strides), dx = dz * weight * invstd (``grad_x_out``: frozen statistics), and
    dweight / dbias."""
    geometry, plan = _plan(x, **tiles)
    acc = accumulator_dtype(x.dtype)
    partial = torch.empty((2, plan.splits, geometry.channels), dtype=sum_dz_out.dtype, device=x.device)
    if grad_z_out is not None and y is not None and grad_z_out.stride() != y.stride():
        raise ValueError("fusedres kernels: grad_z_out must have the output's strides")
    if grad_x_out is not None and grad_x_out.stride() != x.stride():
        raise ValueError("fusedres kernels: grad_x_out must have the input's strides")
    launch(_bn_act_backward_reduce_kernel, plan.grid, dict(
        grad_y_ptr=grad_y, x_ptr=x, y_ptr=y, grad_z_ptr=grad_z_out, grad_x_ptr=grad_x_out, mean_ptr=mean,
        var_ptr=var, weight_ptr=weight, bias_ptr=bias, **_eps_args(eps), partial_sum_dz_ptr=partial[0],
        partial_sum_dz_xhat_ptr=partial[1], **_walk_args(geometry, plan),
        **_stride_args("grad_y", _strides(geometry, grad_y, "grad_output")),
        **_stride_args("x", _strides(geometry, x, "input")),
        **_stride_args("y", _strides(geometry, y if y is not None else grad_z_out, "output")),
        MASK_FROM_OUTPUT=y is not None, WRITE_GRAD_Z=grad_z_out is not None,
        WRITE_GRAD_X=grad_x_out is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        ACC=acc, INT64=needs_int64(grad_y, x, y, grad_z_out, grad_x_out)), plan.num_warps)
    launch(_bn_backward_finalize_kernel, (triton.cdiv(geometry.channels, _FINALIZE_BLOCK_C),), dict(
        partial_sum_dz_ptr=partial[0], partial_sum_dz_xhat_ptr=partial[1], sum_dz_ptr=sum_dz_out,
        sum_dz_xhat_ptr=sum_dz_xhat_out, grad_weight_ptr=grad_weight_out, grad_bias_ptr=grad_bias_out,
        channels=geometry.channels, splits=plan.splits, WRITE_GRAD_WEIGHT=grad_weight_out is not None,
        WRITE_GRAD_BIAS=grad_bias_out is not None, ACC=acc, BLOCK_SPLITS=_FINALIZE_BLOCK_SPLITS,
        BLOCK_C=_FINALIZE_BLOCK_C), 4)


def bn_backward_dx(grad, x, mean, var, weight, bias, eps: float, sum_dz, sum_dz_xhat, *, grad_is_dy: bool,
                   grad_x_out, **tiles) -> None:
    """grad_x_out = batch-norm input gradient with batch statistics, from dz (or from dy, mask recomputed)."""
    geometry, plan = _plan(x, **tiles)
    launch(_bn_backward_dx_kernel, plan.grid, dict(
        grad_ptr=grad, x_ptr=x, grad_x_ptr=grad_x_out, mean_ptr=mean, var_ptr=var, weight_ptr=weight,
        bias_ptr=bias, **_eps_args(eps), sum_dz_ptr=sum_dz, sum_dz_xhat_ptr=sum_dz_xhat,
        count=geometry.outer * geometry.inner,
        **_walk_args(geometry, plan), **_stride_args("grad", _strides(geometry, grad, "gradient")),
        **_stride_args("x", _strides(geometry, x, "input")),
        **_stride_args("grad_x", _strides(geometry, grad_x_out, "grad_input")),
        GRAD_IS_DY=grad_is_dy, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        ACC=accumulator_dtype(x.dtype), INT64=needs_int64(grad, x, grad_x_out)), plan.num_warps)
