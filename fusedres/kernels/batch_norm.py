"""Batch-norm (+ residual add) + activation kernels, forward and backward, and their launchers.

Launches and bytes per element moved (e = element size; docs/design.md's floors):
  inference:          apply                                  read x [, r], write y              2e [3e]
  training forward:   statistics (+ merge, running stats)    read x                             1e
                      apply                                  read x [, r], write y              2e [3e]
  training backward:  reduce (+ merge, dweight, dbias)       read dy, x [, y or r], write [dz]  2e [4e]
                      dx                                     read dy or dz, x, write dx         3e
  eval backward:      reduce, writing dx itself              read dy, x [, y or r], write dx [, dz]  3e [5e]
(identity with a residual: dz is dy, nothing more is read or written.) The activations are
``activations.py``'s; ``slope`` is leaky_relu's negative slope.
Per-channel vectors (statistics, weight, bias, partial rows) are negligible next to these.

Every kernel walks its tensors as ``_launch.py`` describes: program ``(channel block, split)`` visits the chunks of
its split one ``[BLOCK_R, BLOCK_C]`` tile at a time (rows x channels), through ``_load_tile``/``_store_tile``.
A reduction writes one partial row per split; the last program of each channel block to finish merges the rows
in split order (``_last_to_finish``): one launch, no float atomics, bitwise deterministic. Per-channel vectors
are read through their own strides (a column of a matrix, an expanded scalar).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activations import ACTIVATIONS, DERIVATIVE_FROM_OUTPUT, activation_grad, apply_activation
from . import _launch
from ._launch import (ChannelGeometry, TilePlan, accumulator_dtype, fp32_parts, from_fp32_parts, launch,
                      needs_int64, plan_tiles, scratch, stride_alignment, ticket_counters)

# ----------------------------------------------------------------------------------------------------------
# The walk: where a program's channels and chunks are, and how a tile is read and written.
# Walk constexprs shared by every kernel: BLOCK_R x BLOCK_C, the tile; CHANNELS_LAST, the geometry; SLAB_INNER,
# H*W when tiles are read as slabs (0: as rows of pointers); ALIGN, a power of two dividing every stride across
# the contiguous dimension and the extent along it (a promise to the compiler, see stride_alignment); INT64, the
# 64-bit offset switch.
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _channel_block(channels, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr):
    """This program's first channel, its channel offsets and which of them exist."""
    c0 = tl.program_id(0) * BLOCK_C
    offs_c = c0 + tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    if CHANNELS_LAST and ALIGN > 1:  # ALIGN divides the channel count: the mask is constant over a vector
        mask_c = tl.max_constancy(mask_c, [ALIGN])
    return c0, offs_c, mask_c


@triton.jit
def _split_chunks(chunks, chunks_per_split):
    """The range of chunks of this program's split."""
    first = tl.program_id(1) * chunks_per_split
    return first, tl.minimum(first + chunks_per_split, chunks)


@triton.jit
def _tile_rows(chunk, inner, inner_blocks, BLOCK_R: tl.constexpr, CHANNELS_LAST: tl.constexpr,
               SLAB_INNER: tl.constexpr, ALIGN: tl.constexpr):
    """One chunk's outer index, row indices, and which rows exist."""
    if SLAB_INNER > 0:
        inner = SLAB_INNER
    outer = chunk // inner_blocks
    rows = (chunk - outer * inner_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < inner
    if not CHANNELS_LAST and SLAB_INNER == 0 and ALIGN > 1:  # ALIGN divides H*W: constant over a vector
        row_mask = tl.max_constancy(row_mask, [ALIGN])
    return outer, rows, row_mask


@triton.jit
def _tile_offsets(outer, rows, offs_c, stride_outer, stride_inner, stride_channel, CHANNELS_LAST: tl.constexpr,
                  ALIGN: tl.constexpr, INT64: tl.constexpr):
    """Element offsets of a rows-walk tile of a tensor with these strides. ALIGN divides every stride across the
    contiguous dimension and the tile's first row (or channel), so each run along it starts aligned: said to the
    compiler on the offsets, since a hint on a kernel argument does not reach it."""
    if INT64:
        outer = outer.to(tl.int64)
        rows = rows.to(tl.int64)
        offs_c = offs_c.to(tl.int64)
    offsets = outer * stride_outer + rows[:, None] * stride_inner + offs_c[None, :] * stride_channel
    if ALIGN > 1:
        if CHANNELS_LAST:
            offsets = tl.multiple_of(offsets, [1, ALIGN])
        else:
            offsets = tl.multiple_of(offsets, [ALIGN, 1])
    return offsets


@triton.jit
def _slab(outer, c0, channels, stride_outer, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
          SLAB_INNER: tl.constexpr, ALIGN: tl.constexpr, INT64: tl.constexpr):
    """A slab-walk tile as a flat run: its first element, the flat indices, and which of them exist. The
    channels of one sample are contiguous in NCHW, so channels c0 .. c0 + BLOCK_C of sample ``outer`` are one
    run of up to BLOCK_C * SLAB_INNER elements. ALIGN divides the sample strides and the channel count, and is
    at most BLOCK_C: the run starts aligned and its length is a multiple of ALIGN."""
    present = tl.minimum(channels - c0, BLOCK_C)
    if INT64:
        outer = outer.to(tl.int64)
        c0 = c0.to(tl.int64)
    start = outer * stride_outer + c0 * SLAB_INNER
    if ALIGN > 1:
        present = tl.multiple_of(present, ALIGN)
        start = tl.multiple_of(start, ALIGN)
    flat = tl.arange(0, BLOCK_R * BLOCK_C)
    return start, flat, flat < present * SLAB_INNER


@triton.jit
def _load_tile(ptr, outer, rows, row_mask, c0, offs_c, mask_c, channels, stride_outer, stride_inner,
               stride_channel, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
               CHANNELS_LAST: tl.constexpr, SLAB_INNER: tl.constexpr, ALIGN: tl.constexpr, INT64: tl.constexpr):
    """A ``[BLOCK_R, BLOCK_C]`` tile in the accumulator dtype, 0 where rows or channels do not exist."""
    mask = row_mask[:, None] & mask_c[None, :]
    if SLAB_INNER > 0:
        start, flat, present = _slab(outer, c0, channels, stride_outer, BLOCK_R, BLOCK_C, SLAB_INNER, ALIGN, INT64)
        values = tl.load(ptr + start + flat, mask=present, other=0.0).to(ACC)
        # Regroup in registers: element (row r, channel c) of the tile is element c * H*W + r of the run.
        index = tl.arange(0, BLOCK_C)[None, :] * SLAB_INNER + tl.minimum(tl.arange(0, BLOCK_R)[:, None],
                                                                        SLAB_INNER - 1)
        tile = tl.reshape(tl.gather(values, tl.reshape(index, [BLOCK_R * BLOCK_C]), 0), [BLOCK_R, BLOCK_C])
        tile = tl.where(mask, tile, 0.0)
    else:
        offs = _tile_offsets(outer, rows, offs_c, stride_outer, stride_inner, stride_channel, CHANNELS_LAST, ALIGN,
                             INT64)
        tile = tl.load(ptr + offs, mask=mask, other=0.0).to(ACC)
    return tile


@triton.jit
def _store_tile(ptr, tile, outer, rows, row_mask, c0, offs_c, mask_c, channels, stride_outer, stride_inner,
                stride_channel, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                SLAB_INNER: tl.constexpr, ALIGN: tl.constexpr, INT64: tl.constexpr):
    """Store a ``[BLOCK_R, BLOCK_C]`` tile (converted to ptr's dtype) where its rows and channels exist."""
    if SLAB_INNER > 0:
        start, flat, present = _slab(outer, c0, channels, stride_outer, BLOCK_R, BLOCK_C, SLAB_INNER, ALIGN, INT64)
        channel = flat // SLAB_INNER
        row = flat - channel * SLAB_INNER
        values = tl.gather(tl.reshape(tile, [BLOCK_R * BLOCK_C]), row * BLOCK_C + tl.minimum(channel, BLOCK_C - 1), 0)
        tl.store(ptr + start + flat, values.to(ptr.dtype.element_ty), mask=present)
    else:
        offs = _tile_offsets(outer, rows, offs_c, stride_outer, stride_inner, stride_channel, CHANNELS_LAST, ALIGN,
                             INT64)
        tl.store(ptr + offs, tile.to(ptr.dtype.element_ty), mask=row_mask[:, None] & mask_c[None, :])


@triton.jit
def _load_vector(ptr, stride, offs_c, mask_c, other, ACC: tl.constexpr, INT64: tl.constexpr):
    """A per-channel vector, read through its stride."""
    if INT64:
        offs_c = offs_c.to(tl.int64)
    return tl.load(ptr + offs_c * stride, mask=mask_c, other=other).to(ACC)


@triton.jit
def _store_vector(ptr, stride, value, offs_c, mask_c, INT64: tl.constexpr):
    if INT64:
        offs_c = offs_c.to(tl.int64)
    tl.store(ptr + offs_c * stride, value.to(ptr.dtype.element_ty), mask=mask_c)


# ----------------------------------------------------------------------------------------------------------
# Merging partial rows: the last program of a channel block to finish merges every split's row, in split order.
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _last_to_finish(ticket_ptr, programs):
    """Whether this program is the last of ``programs`` to get here, after PyTorch's ``Reduce.cuh``
    (``mark_block_finished``) and apex's Welford ``c_last``: a barrier, so that every thread's partial-row
    stores come before the ticket; an acq_rel ticket at GPU scope, so that they are visible to the program
    that draws the last ticket. That program sets the counter back to zero for the next launch on the stream.
    The acquire alone orders its partial-row loads after every other program's stores (sm_90: ``CCTL.IVALL``
    invalidates L1 after the atomic); those loads are also ``.cg`` (cached in L2 only, where every SM's stores
    land), so that no stale L1 line can be read whatever the lowering of the acquire.
    The counters are integers: no float atomics anywhere."""
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    last = ticket == programs - 1
    tl.store(ticket_ptr, 0, mask=last)
    return last


@triton.jit
def _chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan et al.: the count, mean and sum of squared deviations of two disjoint sets. Deviations are always
    taken from a mean, so there is no E[x^2] - E[x]^2 cancellation. An empty pair merges to zeros."""
    count = count_a + count_b
    fraction = count_b / tl.maximum(count, 1.0)
    delta = mean_b - mean_a
    return count, mean_a + delta * fraction, m2_a + m2_b + delta * delta * count_a * fraction


@triton.jit
def _merge_statistics(partial_ptr, splits, channels, offs_c, mask_c, ACC: tl.constexpr, BLOCK_S: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """Count, mean and M2 per channel from the ``[3, splits, channels]`` partial rows, BLOCK_S rows at a time."""
    count = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    rows = splits * channels
    for s0 in range(0, splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = (offs_s < splits)[:, None] & mask_c[None, :]
        offs = offs_s[:, None] * channels + offs_c[None, :]
        part_count = tl.load(partial_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
        part_mean = tl.load(partial_ptr + rows + offs, mask=mask, other=0.0, cache_modifier=".cg")
        part_m2 = tl.load(partial_ptr + 2 * rows + offs, mask=mask, other=0.0, cache_modifier=".cg")
        block_count = tl.sum(part_count, axis=0)
        block_mean = tl.sum(part_count * part_mean, axis=0) / tl.maximum(block_count, 1.0)
        deviation = tl.where(mask, part_mean - block_mean[None, :], 0.0)
        block_m2 = tl.sum(part_m2 + part_count * deviation * deviation, axis=0)
        count, mean, m2 = _chan_merge(count, mean, m2, block_count, block_mean, block_m2)
    return count, mean, m2


@triton.jit
def _merge_sums(partial_ptr, splits, channels, offs_c, mask_c, ACC: tl.constexpr, BLOCK_S: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """The two per-channel sums of the backward from the ``[2, splits, channels]`` partial rows, in split order."""
    first = tl.zeros([BLOCK_C], dtype=ACC)
    second = tl.zeros([BLOCK_C], dtype=ACC)
    rows = splits * channels
    for s0 in range(0, splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = (offs_s < splits)[:, None] & mask_c[None, :]
        offs = offs_s[:, None] * channels + offs_c[None, :]
        first += tl.sum(tl.load(partial_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg"), axis=0)
        second += tl.sum(tl.load(partial_ptr + rows + offs, mask=mask, other=0.0, cache_modifier=".cg"),
                        axis=0)
    return first, second


# ----------------------------------------------------------------------------------------------------------
# Per-channel arithmetic shared by the forward and the backward.
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _channel_affine(mean_ptr, mean_stride, var_ptr, var_stride, weight_ptr, weight_stride, bias_ptr, bias_stride,
                    eps, eps_residue, offs_c, mask_c, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    ACC: tl.constexpr, INT64: tl.constexpr):
    """Per-channel ``scale, offset, mean, invstd`` such that ``bn(x) = (x - mean) * scale + offset``
    (``_normalized``): subtracting the mean first keeps the digits of a channel whose values sit far from 0 with a
    small spread, which ``x * scale - mean * scale`` would cancel, as eager's ``(x - mean) * invstd`` keeps them.

    The forward and the backward both call this, so the pre-activation the backward recomputes is bit for bit
    the forward's."""
    mean = _load_vector(mean_ptr, mean_stride, offs_c, mask_c, 0.0, ACC, INT64)
    var_eps = (_load_vector(var_ptr, var_stride, offs_c, mask_c, 1.0, ACC, INT64)
               + from_fp32_parts(eps, eps_residue, ACC))
    if ACC == tl.float64:
        invstd = 1.0 / tl.sqrt(var_eps)  # IEEE for fp64; sqrt_rn exists for fp32 only
    else:
        invstd = 1.0 / tl.sqrt_rn(var_eps)
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * _load_vector(weight_ptr, weight_stride, offs_c, mask_c, 1.0, ACC, INT64)
    offset = _load_vector(bias_ptr, bias_stride, offs_c, mask_c, 0.0, ACC, INT64) if HAS_BIAS else tl.zeros_like(mean)
    return scale, offset, mean, invstd


@triton.jit
def _normalized(x, mean, scale, offset):
    """bn(x) from ``_channel_affine``'s per-channel vectors, the same arithmetic in every kernel."""
    return (x - mean[None, :]) * scale[None, :] + offset[None, :]


@triton.jit
def _move_running_statistics(running_mean_ptr, running_mean_stride, running_var_ptr, running_var_stride,
                             num_batches_tracked_ptr, momentum, momentum_residue, mean, var, n, offs_c, mask_c,
                             CUMULATIVE: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr):
    """running = (1 - f) running + f batch, with the batch's unbiased variance over ``n`` values, as eager computes
    it; f = momentum, or 1 / num_batches_tracked read on the device."""
    if CUMULATIVE:
        factor = 1.0 / tl.load(num_batches_tracked_ptr).to(ACC)
    else:
        factor = from_fp32_parts(momentum, momentum_residue, ACC)
    unbiased = var * (n / (n - 1.0))
    running_mean = _load_vector(running_mean_ptr, running_mean_stride, offs_c, mask_c, 0.0, ACC, INT64)
    running_var = _load_vector(running_var_ptr, running_var_stride, offs_c, mask_c, 0.0, ACC, INT64)
    # eager's form: an infinite running value stays infinite ((b - r) would make it NaN)
    _store_vector(running_mean_ptr, running_mean_stride, (1.0 - factor) * running_mean + factor * mean, offs_c,
                  mask_c, INT64)
    _store_vector(running_var_ptr, running_var_stride, (1.0 - factor) * running_var + factor * unbiased, offs_c,
                  mask_c, INT64)


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _bn_stats_kernel(
    x_ptr,
    partial_ptr,                 # [3, splits, channels] scratch: each split's count, mean and M2
    ticket_ptr,                  # [channel_blocks] int32 counters: zero on entry, left zero
    mean_ptr, var_ptr,           # [channels] out: batch mean and biased variance (accumulator dtype)
    running_mean_ptr, running_mean_stride, running_var_ptr, running_var_stride,
    num_batches_tracked_ptr,     # CUMULATIVE: the running-statistics factor is 1 / num_batches_tracked
    momentum, momentum_residue,  # otherwise it is momentum (two fp32 parts)
    count,                       # values per channel, N * H * W: the unbiased variance's n / (n - 1)
    channels, inner, inner_blocks, chunks, chunks_per_split,
    x_stride_outer, x_stride_inner, x_stride_channel,
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr, SLAB_INNER: tl.constexpr,
    ALIGN: tl.constexpr, INT64: tl.constexpr,
):
    """Batch mean and variance per channel (Chan merges of tiles, then of splits), and the running statistics
    moved toward them: running = (1 - f) running + f batch, unbiased variance, as eager computes it.

    Sums are shifted: every program subtracts the channel's first value (its pilot, the same in every program)
    before summing, so that a channel far from 0 with a small spread (12345.678 +- 0.01) does not carry its offset
    through fp32 sums; the merging program adds the pilot back to the mean."""
    c0, offs_c, mask_c = _channel_block(channels, BLOCK_C, CHANNELS_LAST, ALIGN)
    pilot = _load_vector(x_ptr, x_stride_channel, offs_c, mask_c, 0.0, ACC, INT64)  # x[0, c, 0, 0]
    pilot = tl.where(pilot - pilot == 0.0, pilot, 0.0)  # an Inf or NaN pilot: no shift (they propagate as in eager)
    count_acc = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    first, last = _split_chunks(chunks, chunks_per_split)
    for chunk in range(first, last):
        outer, rows, row_mask = _tile_rows(chunk, inner, inner_blocks, BLOCK_R, CHANNELS_LAST, SLAB_INNER, ALIGN)
        x = _load_tile(x_ptr, outer, rows, row_mask, c0, offs_c, mask_c, channels, x_stride_outer, x_stride_inner,
                       x_stride_channel, ACC, BLOCK_R, BLOCK_C, CHANNELS_LAST, SLAB_INNER, ALIGN, INT64)
        x = tl.where(row_mask[:, None], x - pilot[None, :], 0.0)
        tile_count = tl.sum(row_mask.to(ACC), axis=0)
        tile_mean = tl.sum(x, axis=0) / tile_count
        deviation = tl.where(row_mask[:, None] & mask_c[None, :], x - tile_mean[None, :], 0.0)
        count_acc, mean, m2 = _chan_merge(count_acc, mean, m2, tile_count, tile_mean,
                                          tl.sum(deviation * deviation, axis=0))
    splits = tl.num_programs(1)
    row = tl.program_id(1) * channels + offs_c
    tl.store(partial_ptr + row, count_acc, mask=mask_c)
    tl.store(partial_ptr + splits * channels + row, mean, mask=mask_c)
    tl.store(partial_ptr + 2 * splits * channels + row, m2, mask=mask_c)
    if _last_to_finish(ticket_ptr + tl.program_id(0), splits):
        count_all, mean_all, m2_all = _merge_statistics(partial_ptr, splits, channels, offs_c, mask_c, ACC,
                                                        BLOCK_S, BLOCK_C)
        var = m2_all / tl.maximum(count_all, 1.0)
        mean_all += pilot
        tl.store(mean_ptr + offs_c, mean_all, mask=mask_c)
        tl.store(var_ptr + offs_c, var, mask=mask_c)
        if UPDATE_RUNNING:
            _move_running_statistics(running_mean_ptr, running_mean_stride, running_var_ptr, running_var_stride,
                                     num_batches_tracked_ptr, momentum, momentum_residue, mean_all, var,
                                     tl.cast(count, ACC), offs_c, mask_c, CUMULATIVE, ACC, INT64)


@triton.jit
def _bn_merge_ranks_kernel(
    gathered_ptr,                # [ranks, 3, channels] fp64: every rank's count, mean and biased variance
    ranks,
    mean_ptr, var_ptr,           # [channels] out: the whole group's mean and biased variance
    count_ptr,                   # [channels] fp64 out: the whole group's count (the backward divides by it)
    running_mean_ptr, running_mean_stride, running_var_ptr, running_var_stride,
    num_batches_tracked_ptr, momentum, momentum_residue,
    channels,
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
):
    """A synchronized batch-norm's statistics: the ranks' rows Chan-merged in rank order (the same bits on every
    rank), and the running statistics moved with the global count (left as they are if every rank was empty)."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    count = tl.zeros([BLOCK_C], dtype=tl.float64)
    mean = tl.zeros([BLOCK_C], dtype=tl.float64)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    for rank in range(ranks):
        row = gathered_ptr + rank * 3 * channels + offs_c
        rank_count = tl.load(row, mask=mask_c, other=0.0)
        rank_mean = tl.load(row + channels, mask=mask_c, other=0.0)
        rank_m2 = tl.load(row + 2 * channels, mask=mask_c, other=0.0) * rank_count
        count, mean, m2 = _chan_merge(count, mean, m2, rank_count, rank_mean, rank_m2)
    var = m2 / tl.maximum(count, 1.0)
    tl.store(mean_ptr + offs_c, mean, mask=mask_c)
    tl.store(var_ptr + offs_c, var, mask=mask_c)
    tl.store(count_ptr + offs_c, count, mask=mask_c)
    if UPDATE_RUNNING:
        _move_running_statistics(running_mean_ptr, running_mean_stride, running_var_ptr, running_var_stride,
                                 num_batches_tracked_ptr, momentum, momentum_residue, mean, var,
                                 # a global count of 1 (eager refuses it; refusing here would sync the host) has
                                 # variance 0, which any finite n / (n - 1) keeps
                                 tl.maximum(count, 2.0), offs_c, mask_c & (count > 0.0), CUMULATIVE, tl.float64,
                                 INT64)


@triton.jit
def _bn_act_apply_kernel(
    x_ptr, residual_ptr, y_ptr,
    mean_ptr, mean_stride, var_ptr, var_stride,  # the batch's statistics, or the running ones
    weight_ptr, weight_stride, bias_ptr, bias_stride,
    eps, eps_residue,                            # two fp32 parts
    slope, slope_residue,                        # leaky_relu's negative slope, two fp32 parts
    channels, inner, inner_blocks, chunks, chunks_per_split,
    x_stride_outer, x_stride_inner, x_stride_channel,
    residual_stride_outer, residual_stride_inner, residual_stride_channel,
    y_stride_outer, y_stride_inner, y_stride_channel,
    ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr, SLAB_INNER: tl.constexpr,
    ALIGN: tl.constexpr, INT64: tl.constexpr,
):
    """y = act((x - mean) * scale + offset [+ residual])."""
    c0, offs_c, mask_c = _channel_block(channels, BLOCK_C, CHANNELS_LAST, ALIGN)
    scale, offset, mean, _invstd = _channel_affine(mean_ptr, mean_stride, var_ptr, var_stride, weight_ptr,
                                                   weight_stride, bias_ptr, bias_stride, eps, eps_residue, offs_c,
                                                   mask_c, HAS_WEIGHT, HAS_BIAS, ACC, INT64)
    first, last = _split_chunks(chunks, chunks_per_split)
    for chunk in range(first, last):
        outer, rows, row_mask = _tile_rows(chunk, inner, inner_blocks, BLOCK_R, CHANNELS_LAST, SLAB_INNER, ALIGN)
        x = _load_tile(x_ptr, outer, rows, row_mask, c0, offs_c, mask_c, channels, x_stride_outer, x_stride_inner,
                       x_stride_channel, ACC, BLOCK_R, BLOCK_C, CHANNELS_LAST, SLAB_INNER, ALIGN, INT64)
        z = _normalized(x, mean, scale, offset)
        if HAS_RESIDUAL:
            z += _load_tile(residual_ptr, outer, rows, row_mask, c0, offs_c, mask_c, channels, residual_stride_outer,
                            residual_stride_inner, residual_stride_channel, ACC, BLOCK_R, BLOCK_C, CHANNELS_LAST,
                            SLAB_INNER, ALIGN, INT64)
        y = apply_activation(z, from_fp32_parts(slope, slope_residue, ACC), ACTIVATION)
        _store_tile(y_ptr, y, outer, rows, row_mask, c0, offs_c, mask_c, channels, y_stride_outer, y_stride_inner,
                    y_stride_channel, BLOCK_R, BLOCK_C, CHANNELS_LAST, SLAB_INNER, ALIGN, INT64)


# ----------------------------------------------------------------------------------------------------------
# Backward. For y = act(z), z = xhat * w + b [+ r], xhat = (x - mean) * invstd, per channel over the
# M = N * H * W values of the batch:
#   dz      = dy * act'(z)                              (also the residual's gradient)
#   dbias   = sum(dz),  dweight = sum(dz * xhat)
#   dx      = w * invstd * (dz - sum(dz) / M - xhat * sum(dz * xhat) / M)     batch statistics (training)
#   dx      = w * invstd * dz                                                 frozen statistics: one pass
# act'(z): without a residual, z = (x - mean) * scale + offset is recomputed from x with the forward's own arithmetic
# (_channel_affine, _normalized), so the backward reads dy and x only. With one, z needs r as well: the ReLU family
# reads its derivative from the saved output instead (y <= 0 exactly where z <= 0; 0 < y < 6 where 0 < z < 6); the
# other activations read r (the block's input, which the next layer saves anyway). The reduce pass then writes dz,
# which the dx pass reads in place of dy: 4e + 3e, where re-reading y or r in the dx pass would also cost 7e. The
# identity needs no z at all: dz is dy.
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _bn_backward_reduce_kernel(
    grad_y_ptr, x_ptr,
    pre_ptr,                     # what the pre-activation needs beyond x: the output y or the residual r
    grad_z_ptr,                  # out (pre's strides): dz, when WRITE_GRAD_Z
    grad_x_ptr,                  # out (x's strides): dx with frozen statistics, when WRITE_GRAD_X
    mean_ptr, mean_stride, var_ptr, var_stride, weight_ptr, weight_stride, bias_ptr, bias_stride,
    eps, eps_residue, slope, slope_residue,
    partial_ptr,                 # [2, splits, channels] scratch: each split's sum(dz) and sum(dz * xhat)
    ticket_ptr,                  # [channel_blocks] int32 counters: zero on entry, left zero
    sums_ptr,                    # [2, channels] out: sum(dz), sum(dz * xhat) (accumulator dtype)
    grad_weight_ptr, grad_bias_ptr,
    channels, inner, inner_blocks, chunks, chunks_per_split,
    grad_y_stride_outer, grad_y_stride_inner, grad_y_stride_channel,
    x_stride_outer, x_stride_inner, x_stride_channel,
    pre_stride_outer, pre_stride_inner, pre_stride_channel,
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
    c0, offs_c, mask_c = _channel_block(channels, BLOCK_C, CHANNELS_LAST, ALIGN)
    scale, offset, mean, invstd = _channel_affine(mean_ptr, mean_stride, var_ptr, var_stride, weight_ptr,
                                                 weight_stride, bias_ptr, bias_stride, eps, eps_residue, offs_c,
                                                 mask_c, HAS_WEIGHT, HAS_BIAS, ACC, INT64)
    sum_dz = tl.zeros([BLOCK_C], dtype=ACC)
    sum_dz_xhat = tl.zeros([BLOCK_C], dtype=ACC)
    first, last = _split_chunks(chunks, chunks_per_split)
    for chunk in range(first, last):
        outer, rows, row_mask = _tile_rows(chunk, inner, inner_blocks, BLOCK_R, CHANNELS_LAST, SLAB_INNER, ALIGN)
        x = _load_tile(x_ptr, outer, rows, row_mask, c0, offs_c, mask_c, channels, x_stride_outer, x_stride_inner,
                       x_stride_channel, ACC, BLOCK_R, BLOCK_C, CHANNELS_LAST, SLAB_INNER, ALIGN, INT64)
        dy = _load_tile(grad_y_ptr, outer, rows, row_mask, c0, offs_c, mask_c, channels, grad_y_stride_outer,
                        grad_y_stride_inner, grad_y_stride_channel, ACC, BLOCK_R, BLOCK_C, CHANNELS_LAST,
                        SLAB_INNER, ALIGN, INT64)
        if PRE == "input":
            z = _normalized(x, mean, scale, offset)
        else:
            z = _load_tile(pre_ptr, outer, rows, row_mask, c0, offs_c, mask_c, channels, pre_stride_outer,
                           pre_stride_inner, pre_stride_channel, ACC, BLOCK_R, BLOCK_C, CHANNELS_LAST, SLAB_INNER,
                           ALIGN, INT64)
            if PRE == "residual":
                z += _normalized(x, mean, scale, offset)
        # The derivative taken on the output y works for the ReLU family (see above); dy is 0 where rows or
        # channels do not exist, and so is dz.
        dz = activation_grad(dy, z, from_fp32_parts(slope, slope_residue, ACC), ACTIVATION)
        if WRITE_GRAD_Z:
            _store_tile(grad_z_ptr, dz, outer, rows, row_mask, c0, offs_c, mask_c, channels, pre_stride_outer,
                        pre_stride_inner, pre_stride_channel, BLOCK_R, BLOCK_C, CHANNELS_LAST, SLAB_INNER, ALIGN,
                        INT64)
        if WRITE_GRAD_X:
            _store_tile(grad_x_ptr, dz * scale[None, :], outer, rows, row_mask, c0, offs_c, mask_c, channels,
                        x_stride_outer, x_stride_inner, x_stride_channel, BLOCK_R, BLOCK_C, CHANNELS_LAST,
                        SLAB_INNER, ALIGN, INT64)
        if MERGE:
            sum_dz += tl.sum(dz, axis=0)
            xhat = tl.where(row_mask[:, None], (x - mean[None, :]) * invstd[None, :], 0.0)
            sum_dz_xhat += tl.sum(dz * xhat, axis=0)
    if MERGE:
        splits = tl.num_programs(1)
        row = tl.program_id(1) * channels + offs_c
        tl.store(partial_ptr + row, sum_dz, mask=mask_c)
        tl.store(partial_ptr + splits * channels + row, sum_dz_xhat, mask=mask_c)
        if _last_to_finish(ticket_ptr + tl.program_id(0), splits):
            total_dz, total_dz_xhat = _merge_sums(partial_ptr, splits, channels, offs_c, mask_c, ACC, BLOCK_S,
                                                  BLOCK_C)
            tl.store(sums_ptr + offs_c, total_dz, mask=mask_c)
            tl.store(sums_ptr + channels + offs_c, total_dz_xhat, mask=mask_c)
            if WRITE_GRAD_WEIGHT:
                tl.store(grad_weight_ptr + offs_c, total_dz_xhat.to(grad_weight_ptr.dtype.element_ty), mask=mask_c)
            if WRITE_GRAD_BIAS:
                tl.store(grad_bias_ptr + offs_c, total_dz.to(grad_bias_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def _bn_backward_dx_kernel(
    grad_ptr,                    # dz, or dy when GRAD_IS_DY (act'(z) then recomputed from x)
    x_ptr, grad_x_ptr,
    mean_ptr, mean_stride, var_ptr, var_stride, weight_ptr, weight_stride, bias_ptr, bias_stride,
    eps, eps_residue, slope, slope_residue,
    sums_ptr,                    # [2, channels]: sum(dz), sum(dz * xhat), from the reduce pass
    count,                       # M = N * H * W
    channels, inner, inner_blocks, chunks, chunks_per_split,
    grad_stride_outer, grad_stride_inner, grad_stride_channel,
    x_stride_outer, x_stride_inner, x_stride_channel,
    grad_x_stride_outer, grad_x_stride_inner, grad_x_stride_channel,
    ACTIVATION: tl.constexpr, GRAD_IS_DY: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr, SLAB_INNER: tl.constexpr,
    ALIGN: tl.constexpr, INT64: tl.constexpr,
):
    """dx with batch statistics (see the derivation above)."""
    c0, offs_c, mask_c = _channel_block(channels, BLOCK_C, CHANNELS_LAST, ALIGN)
    scale, offset, mean, invstd = _channel_affine(mean_ptr, mean_stride, var_ptr, var_stride, weight_ptr,
                                                 weight_stride, bias_ptr, bias_stride, eps, eps_residue, offs_c,
                                                 mask_c, HAS_WEIGHT, HAS_BIAS, ACC, INT64)
    inv_count = 1.0 / tl.cast(count, ACC)  # in-kernel, so that fp64 keeps fp64 (a float argument is fp32)
    mean_dz = tl.load(sums_ptr + offs_c, mask=mask_c, other=0.0) * inv_count
    mean_dz_xhat = tl.load(sums_ptr + channels + offs_c, mask=mask_c, other=0.0) * inv_count
    first, last = _split_chunks(chunks, chunks_per_split)
    for chunk in range(first, last):
        outer, rows, row_mask = _tile_rows(chunk, inner, inner_blocks, BLOCK_R, CHANNELS_LAST, SLAB_INNER, ALIGN)
        x = _load_tile(x_ptr, outer, rows, row_mask, c0, offs_c, mask_c, channels, x_stride_outer, x_stride_inner,
                       x_stride_channel, ACC, BLOCK_R, BLOCK_C, CHANNELS_LAST, SLAB_INNER, ALIGN, INT64)
        dz = _load_tile(grad_ptr, outer, rows, row_mask, c0, offs_c, mask_c, channels, grad_stride_outer,
                        grad_stride_inner, grad_stride_channel, ACC, BLOCK_R, BLOCK_C, CHANNELS_LAST, SLAB_INNER,
                        ALIGN, INT64)
        if GRAD_IS_DY:
            dz = activation_grad(dz, _normalized(x, mean, scale, offset), from_fp32_parts(slope, slope_residue, ACC),
                                ACTIVATION)
        xhat = (x - mean[None, :]) * invstd[None, :]
        dx = (dz - mean_dz[None, :] - xhat * mean_dz_xhat[None, :]) * scale[None, :]
        _store_tile(grad_x_ptr, dx, outer, rows, row_mask, c0, offs_c, mask_c, channels, grad_x_stride_outer,
                    grad_x_stride_inner, grad_x_stride_channel, BLOCK_R, BLOCK_C, CHANNELS_LAST, SLAB_INNER, ALIGN,
                    INT64)


# ----------------------------------------------------------------------------------------------------------
# Launchers. They take their outputs as arguments; only per-launch scratch (partial rows) and the per-stream
# ticket counters are theirs. ``tiles`` (block_rows, block_channels, target_programs, slab) override the shape
# heuristic: tests use them for masks, tails, merges of many splits, and both walks on one shape.
# ----------------------------------------------------------------------------------------------------------

def _plan(x: torch.Tensor, **tiles) -> tuple[ChannelGeometry, TilePlan]:
    geometry = ChannelGeometry.of(x)
    return geometry, plan_tiles(geometry, x.element_size(), **tiles)


def walkable(x: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether the kernels can read ``t`` (same shape as the dense ``x``) through its strides, in the walk they
    take over x."""
    geometry, plan = _plan(x)
    return (geometry.slab_strides(t) if plan.slab else geometry.strides(t)) is not None


def _walk_args(geometry: ChannelGeometry, plan: TilePlan, operands: dict) -> dict:
    """The walk's kernel arguments: the geometry, the split, the walk constexprs and every operand's
    ``<name>_stride_{outer,inner,channel}``."""
    strides = {}
    for name, t in operands.items():
        if t is None:
            strides[name] = (0, 0, 0)
            continue
        strides[name] = geometry.slab_strides(t) if plan.slab else geometry.strides(t)
        if strides[name] is None:
            raise ValueError(f"fusedres kernels: {name} with strides {tuple(t.stride())} cannot be walked in the "
                             f"input's layout; make it dense in that layout first")
    args = dict(channels=geometry.channels, inner=geometry.inner, inner_blocks=plan.inner_blocks,
                chunks=plan.chunks, chunks_per_split=plan.chunks_per_split, BLOCK_R=plan.block_rows,
                BLOCK_C=plan.block_channels, CHANNELS_LAST=geometry.channels_last,
                SLAB_INNER=geometry.inner if plan.slab else 0,
                ALIGN=stride_alignment(geometry, plan, list(strides.values())))
    for name, (outer, inner, channel) in strides.items():
        args.update({f"{name}_stride_outer": outer, f"{name}_stride_inner": inner,
                     f"{name}_stride_channel": channel})
    return args


def _vector_args(**vectors) -> dict:
    """``<name>_ptr`` and ``<name>_stride`` of per-channel vectors (None: absent)."""
    args = {}
    for name, t in vectors.items():
        args[f"{name}_ptr"] = t
        args[f"{name}_stride"] = 0 if t is None else t.stride(0)
    return args


def _eps_args(eps: float) -> dict:
    eps, eps_residue = fp32_parts(eps)
    return dict(eps=eps, eps_residue=eps_residue)


def _slope_args(slope: float) -> dict:
    slope, slope_residue = fp32_parts(slope)
    return dict(slope=slope, slope_residue=slope_residue)


def bn_act_apply(x, residual, mean, var, weight, bias, eps: float, out, *, activation: str = "relu",
                 slope: float = 0.0, **tiles) -> None:
    """out = act(batch_norm(x; mean, var, weight, bias) [+ residual])."""
    if x.numel() == 0:
        return
    geometry, plan = _plan(x, **tiles)
    launch(_bn_act_apply_kernel, plan.grid, dict(
        x_ptr=x, residual_ptr=residual, y_ptr=out, **_vector_args(mean=mean, var=var, weight=weight, bias=bias),
        **_eps_args(eps), **_slope_args(slope), **_walk_args(geometry, plan, dict(x=x, residual=residual, y=out)),
        ACTIVATION=_activation(activation), HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        # An fp64 residual makes an fp64 output: keep its precision, as eager's fp64 add does.
        ACC=accumulator_dtype(torch.promote_types(x.dtype, out.dtype)),
        INT64=needs_int64(x, residual, out, mean, var, weight, bias)), plan.num_warps)


def _activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"fusedres kernels: unknown activation {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return name


def bn_batch_stats(x, mean_out, var_out, running_mean=None, running_var=None, *, momentum: float = 0.0,
                   num_batches_tracked=None, **tiles) -> None:
    """mean_out, var_out = per-channel mean and biased variance of x (accumulator dtype); with running statistics,
    also moves them toward the batch's, in place: factor ``momentum``, or ``1 / num_batches_tracked`` read on the
    device (momentum=None). One launch."""
    geometry, plan = _plan(x, **tiles)
    acc = accumulator_dtype(x.dtype)
    momentum_hi, momentum_lo = fp32_parts(momentum)
    launch(_bn_stats_kernel, plan.grid, dict(
        # partial rows in the accumulator's dtype (the merge's loop keeps one type), whatever mean_out's
        x_ptr=x, partial_ptr=scratch((3, plan.splits, geometry.channels),
                                     torch.float64 if acc == tl.float64 else torch.float32, x.device),
        ticket_ptr=ticket_counters(x.device, plan.channel_blocks), mean_ptr=mean_out, var_ptr=var_out,
        **_vector_args(running_mean=running_mean, running_var=running_var),
        num_batches_tracked_ptr=num_batches_tracked, momentum=momentum_hi, momentum_residue=momentum_lo,
        count=geometry.outer * geometry.inner, **_walk_args(geometry, plan, dict(x=x)),
        UPDATE_RUNNING=running_mean is not None, CUMULATIVE=num_batches_tracked is not None, ACC=acc,
        BLOCK_S=plan.merge_block_splits, INT64=needs_int64(x, running_mean, running_var)), plan.num_warps)


def bn_merge_ranks(gathered, mean_out, var_out, count_out, running_mean=None, running_var=None, *,
                   momentum: float = 0.0, num_batches_tracked=None) -> None:
    """A synchronized batch-norm's statistics from ``gathered``, every rank's ``[3, channels]`` (count, mean,
    biased variance) stacked in rank order (fp64): mean_out, var_out (the statistics dtype) and count_out (fp64) per
    channel; with running statistics, moves them as ``bn_batch_stats`` does, with the global count. One launch."""
    ranks, _, channels = gathered.shape
    block_c = 128
    momentum_hi, momentum_lo = fp32_parts(momentum)
    launch(_bn_merge_ranks_kernel, (triton.cdiv(channels, block_c),), dict(
        gathered_ptr=gathered.contiguous(), ranks=ranks, mean_ptr=mean_out, var_ptr=var_out, count_ptr=count_out,
        **_vector_args(running_mean=running_mean, running_var=running_var),
        num_batches_tracked_ptr=num_batches_tracked, momentum=momentum_hi, momentum_residue=momentum_lo,
        channels=channels, UPDATE_RUNNING=running_mean is not None, CUMULATIVE=num_batches_tracked is not None,
        BLOCK_C=block_c, INT64=needs_int64(running_mean, running_var)), 4)


def bn_act_backward_reduce(grad_y, x, mean, var, weight, bias, eps: float, *, sums_out, activation: str = "relu",
                           slope: float = 0.0, output=None, residual=None, grad_z_out=None, grad_x_out=None,
                           grad_weight_out=None, grad_bias_out=None, need_sums: bool = True, **tiles) -> None:
    """dz = grad_y * act'(pre-activation) and, when ``need_sums``, ``sums_out`` = per-channel sum(dz) and
    sum(dz * xhat) (a ``[2, channels]`` tensor in the accumulator dtype), dbias and dweight. One launch.

    The pre-activation: from x alone (no residual was added), from the saved ``output`` (a residual was added and
    the activation is of the ReLU family), or from x and the ``residual``. Optionally writes dz (``grad_z_out``,
    with the output's or the residual's strides), dx = dz * weight * invstd (``grad_x_out``, x's strides: frozen
    statistics), and dweight / dbias (contiguous)."""
    activation = _activation(activation)
    if output is not None and residual is not None:
        raise ValueError("fusedres kernels: the pre-activation comes from the output or from the residual, not both")
    if output is not None and activation not in DERIVATIVE_FROM_OUTPUT:
        raise ValueError(f"fusedres kernels: {activation}'s derivative cannot be read from its output")
    pre = output if output is not None else residual
    geometry, plan = _plan(x, **tiles)
    if grad_x_out is not None and pre is not None and not plan.slab and "tile_elements" not in tiles:
        # x, dy, the pre-activation source and dz live at once: a smaller tile keeps them in registers (the slab
        # walk's regrouping through shared memory keeps fewer values live; ptxas spills there if the tile shrinks)
        geometry, plan = _plan(x, tile_elements=_launch.CONSTANTS.busy_tile_elements, **tiles)
    if grad_z_out is not None and pre is not None and grad_z_out.stride() != pre.stride():
        raise ValueError("fusedres kernels: grad_z_out must have the strides of the output or residual it is read with")
    if grad_x_out is not None and grad_x_out.stride() != x.stride():
        raise ValueError("fusedres kernels: grad_x_out must have the input's strides")
    need_sums = need_sums or grad_weight_out is not None or grad_bias_out is not None
    launch(_bn_backward_reduce_kernel, plan.grid, dict(
        grad_y_ptr=grad_y, x_ptr=x, pre_ptr=pre, grad_z_ptr=grad_z_out, grad_x_ptr=grad_x_out,
        **_vector_args(mean=mean, var=var, weight=weight, bias=bias), **_eps_args(eps), **_slope_args(slope),
        partial_ptr=scratch((2, plan.splits if need_sums else 0, geometry.channels), sums_out.dtype, x.device),
        ticket_ptr=ticket_counters(x.device, plan.channel_blocks), sums_ptr=sums_out,
        grad_weight_ptr=grad_weight_out, grad_bias_ptr=grad_bias_out,
        **_walk_args(geometry, plan, dict(grad_y=grad_y, x=x, pre=pre if pre is not None else grad_z_out)),
        ACTIVATION=activation, PRE="output" if output is not None else "residual" if residual is not None else "input",
        WRITE_GRAD_Z=grad_z_out is not None, WRITE_GRAD_X=grad_x_out is not None,
        MERGE=need_sums, WRITE_GRAD_WEIGHT=grad_weight_out is not None, WRITE_GRAD_BIAS=grad_bias_out is not None,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACC=accumulator_dtype(x.dtype),
        BLOCK_S=plan.merge_block_splits,
        INT64=needs_int64(grad_y, x, pre, grad_z_out, grad_x_out, mean, var, weight, bias)), plan.num_warps)


def bn_backward_dx(grad, x, mean, var, weight, bias, eps: float, sums, *, grad_is_dy: bool, grad_x_out,
                   activation: str = "relu", slope: float = 0.0, count: int | None = None, **tiles) -> None:
    """grad_x_out = batch-norm input gradient with batch statistics, from dz (or from dy, act'(z) recomputed from
    x); ``sums`` is the reduce pass's ``[2, channels]`` sum(dz), sum(dz * xhat), over ``count`` values per channel
    (default: x's; a synchronized batch-norm passes the means over the process group's batch, and 1)."""
    geometry, plan = _plan(x, **tiles)
    launch(_bn_backward_dx_kernel, plan.grid, dict(
        grad_ptr=grad, x_ptr=x, grad_x_ptr=grad_x_out, **_vector_args(mean=mean, var=var, weight=weight, bias=bias),
        **_eps_args(eps), **_slope_args(slope), sums_ptr=sums,
        count=geometry.outer * geometry.inner if count is None else count,
        **_walk_args(geometry, plan, dict(grad=grad, x=x, grad_x=grad_x_out)),
        ACTIVATION=_activation(activation), GRAD_IS_DY=grad_is_dy, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, ACC=accumulator_dtype(x.dtype),
        INT64=needs_int64(grad, x, grad_x_out, mean, var, weight, bias)), plan.num_warps)
