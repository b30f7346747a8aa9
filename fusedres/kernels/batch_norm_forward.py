"""The forward's kernels: batch statistics (with the merge and the running statistics, one launch), the merge of
several ranks' statistics (synchronized batch-norm), and normalize [+ add] + activation. Their launchers are
``batch_norm.py``'s.

Arguments as every batch-norm kernel takes them (``walk.py``'s walk_args, vector_args, scalar_args): ``walk``, the
runtime tuple (channels, inner, inner_blocks, chunks, chunks_per_split), then each walked operand's strides,
``<operand>_strides`` (outer, inner, channel), after the pointers and scalars (an order ptxas was measured on: moving
the strides next to their pointers cost the fp32 NCHW training backward 8 registers); per-channel vectors as
``(pointer, stride)``; float scalars as two fp32 parts; then the walk constexprs (tiles.py)."""
from __future__ import annotations

import triton
import triton.language as tl

from .activations import apply_activation
from .tiles import (chan_merge, channel_affine, channel_block, chunk_tile, last_to_finish, load_tile, load_vector,
                    merge_statistics, move_running_statistics, normalized, split_chunks, store_tile)
from .walk import from_fp32_parts

@triton.jit
def bn_stats_kernel(
    x_ptr,
    partial_ptr,                 # [3, splits, channels] scratch: each split's count, mean and M2
    ticket_ptr,                  # [channel_blocks] int32 counters: zero on entry, left zero
    mean_ptr, var_ptr,           # [channels] out: batch mean and biased variance (accumulator dtype)
    running_mean, running_var, num_batches_tracked_ptr,
    momentum,                    # the running-statistics factor, unless CUMULATIVE: 1 / num_batches_tracked
    count,                       # values per channel, N * H * W: the unbiased variance's n / (n - 1)
    walk, x_strides,
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr, SLAB_INNER: tl.constexpr,
    ALIGN: tl.constexpr, INT64: tl.constexpr,
):
    """Batch mean and variance per channel (Chan merges of tiles, then of splits), and the running statistics
    moved toward them: running = (1 - f) running + f batch, unbiased variance, as eager computes it.

    Sums are shifted: every program subtracts the channel's first value (its pilot, the same in every program)
    before summing, so that a channel far from 0 with a small spread (12345.678 +- 0.01) does not carry its offset
    through fp32 sums; the merging program adds the pilot back to the mean."""
    c0, offs_c, mask_c = channel_block(walk, BLOCK_C, CHANNELS_LAST, ALIGN)
    pilot = load_vector((x_ptr, x_strides[2]), offs_c, mask_c, 0.0, ACC, INT64)  # x[0, c, 0, 0]
    pilot = tl.where(pilot - pilot == 0.0, pilot, 0.0)  # an Inf or NaN pilot: no shift (they propagate as in eager)
    count_acc = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    first, last = split_chunks(walk)
    for chunk in range(first, last):
        tile = chunk_tile(chunk, walk, c0, offs_c, mask_c, BLOCK_R, CHANNELS_LAST, SLAB_INNER, ALIGN)
        row_mask = tile[2]
        x = load_tile(x_ptr, x_strides, tile, ACC, BLOCK_R, BLOCK_C, CHANNELS_LAST, SLAB_INNER, ALIGN, INT64)
        x = tl.where(row_mask[:, None], x - pilot[None, :], 0.0)
        tile_count = tl.sum(row_mask.to(ACC), axis=0)
        tile_mean = tl.sum(x, axis=0) / tile_count
        deviation = tl.where(row_mask[:, None] & mask_c[None, :], x - tile_mean[None, :], 0.0)
        count_acc, mean, m2 = chan_merge(count_acc, mean, m2, tile_count, tile_mean,
                                          tl.sum(deviation * deviation, axis=0))
    channels = walk[0]
    splits = tl.num_programs(1)
    row = tl.program_id(1) * channels + offs_c
    tl.store(partial_ptr + row, count_acc, mask=mask_c)
    tl.store(partial_ptr + splits * channels + row, mean, mask=mask_c)
    tl.store(partial_ptr + 2 * splits * channels + row, m2, mask=mask_c)
    if last_to_finish(ticket_ptr + tl.program_id(0), splits):
        count_all, mean_all, m2_all = merge_statistics(partial_ptr, splits, channels, offs_c, mask_c, ACC,
                                                        BLOCK_S, BLOCK_C)
        var = m2_all / tl.maximum(count_all, 1.0)
        mean_all += pilot
        tl.store(mean_ptr + offs_c, mean_all, mask=mask_c)
        tl.store(var_ptr + offs_c, var, mask=mask_c)
        if UPDATE_RUNNING:
            move_running_statistics(running_mean, running_var, num_batches_tracked_ptr, momentum, mean_all, var,
                                    tl.cast(count, ACC), offs_c, mask_c, CUMULATIVE, ACC, INT64)


@triton.jit
def bn_merge_ranks_kernel(
    gathered_ptr,                # [ranks, 3, channels] fp64: every rank's count, mean and biased variance
    ranks,
    mean_ptr, var_ptr,           # [channels] out: the whole group's mean and biased variance
    count_ptr,                   # [channels] fp64 out: the whole group's count (the backward divides by it)
    running_mean, running_var, num_batches_tracked_ptr, momentum,
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
        count, mean, m2 = chan_merge(count, mean, m2, rank_count, rank_mean, rank_m2)
    var = m2 / tl.maximum(count, 1.0)
    tl.store(mean_ptr + offs_c, mean, mask=mask_c)
    tl.store(var_ptr + offs_c, var, mask=mask_c)
    tl.store(count_ptr + offs_c, count, mask=mask_c)
    if UPDATE_RUNNING:
        # a global count of 1 (eager refuses it; refusing here would sync the host) has variance 0, which any
        # finite n / (n - 1) keeps
        move_running_statistics(running_mean, running_var, num_batches_tracked_ptr, momentum, mean, var,
                                tl.maximum(count, 2.0), offs_c, mask_c & (count > 0.0), CUMULATIVE, tl.float64,
                                INT64)


@triton.jit
def bn_act_apply_kernel(
    x_ptr, residual_ptr, y_ptr,
    mean, var,                   # the batch's statistics, or the running ones
    weight, bias, eps,
    slope,                       # leaky_relu's negative slope
    walk, x_strides, residual_strides, y_strides,
    ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr, SLAB_INNER: tl.constexpr,
    ALIGN: tl.constexpr, INT64: tl.constexpr,
):
    """y = act((x - mean) * scale + offset [+ residual])."""
    c0, offs_c, mask_c = channel_block(walk, BLOCK_C, CHANNELS_LAST, ALIGN)
    scale, offset, mean, _invstd = channel_affine(mean, var, weight, bias, eps, offs_c, mask_c, HAS_WEIGHT,
                                                  HAS_BIAS, ACC, INT64)
    first, last = split_chunks(walk)
    for chunk in range(first, last):
        tile = chunk_tile(chunk, walk, c0, offs_c, mask_c, BLOCK_R, CHANNELS_LAST, SLAB_INNER, ALIGN)
        x = load_tile(x_ptr, x_strides, tile, ACC, BLOCK_R, BLOCK_C, CHANNELS_LAST, SLAB_INNER, ALIGN, INT64)
        z = normalized(x, mean, scale, offset)
        if HAS_RESIDUAL:
            z += load_tile(residual_ptr, residual_strides, tile, ACC, BLOCK_R, BLOCK_C, CHANNELS_LAST, SLAB_INNER,
                           ALIGN, INT64)
        y = apply_activation(z, from_fp32_parts(slope, ACC), ACTIVATION)
        store_tile(y_ptr, y, y_strides, tile, BLOCK_R, BLOCK_C, CHANNELS_LAST, SLAB_INNER, ALIGN, INT64)
