"""The ``@triton.jit`` pieces every batch-norm kernel is made of: the walk (``walk.py`` describes it: which channels
and chunks a program covers, and reading and writing one tile, as rows of pointers or as a slab), the
last-program merge of partial rows, and the per-channel arithmetic the forward and the backward share."""
from __future__ import annotations

import triton
import triton.language as tl

from .walk import from_fp32_parts

# ----------------------------------------------------------------------------------------------------------
# The walk: where a program's channels and chunks are, and how a tile is read and written.
# Walk constexprs shared by every kernel: BLOCK_R x BLOCK_C, the tile; CHANNELS_LAST, the geometry; SLAB_INNER,
# H*W when tiles are read as slabs (0: as rows of pointers); ALIGN, a power of two dividing every stride across
# the contiguous dimension and the extent along it (a promise to the compiler, see stride_alignment); INT64, the
# 64-bit offset switch.
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def channel_block(walk, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr):
    """This program's first channel, its channel offsets and which of them exist."""
    channels = walk[0]
    c0 = tl.program_id(0) * BLOCK_C
    offs_c = c0 + tl.arange(0, BLOCK_C)
    mask_c = offs_c < channels
    if CHANNELS_LAST and ALIGN > 1:  # ALIGN divides the channel count: the mask is constant over a vector
        mask_c = tl.max_constancy(mask_c, [ALIGN])
    return c0, offs_c, mask_c


@triton.jit
def split_chunks(walk):
    """The range of chunks of this program's split."""
    _channels, _inner, _inner_blocks, chunks, chunks_per_split = walk
    first = tl.program_id(1) * chunks_per_split
    return first, tl.minimum(first + chunks_per_split, chunks)


@triton.jit
def chunk_tile(chunk, walk, c0, offs_c, mask_c, BLOCK_R: tl.constexpr, CHANNELS_LAST: tl.constexpr,
               SLAB_INNER: tl.constexpr, ALIGN: tl.constexpr):
    """One chunk's tile of this program's channel block (``channel_block``'s): ``(outer, rows, row_mask, c0,
    offs_c, mask_c, channels)``, the outer index, the row indices and which rows exist beside the channels'."""
    channels, inner, inner_blocks, _chunks, _chunks_per_split = walk
    if SLAB_INNER > 0:
        inner = SLAB_INNER
    outer = chunk // inner_blocks
    rows = (chunk - outer * inner_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < inner
    if not CHANNELS_LAST and SLAB_INNER == 0 and ALIGN > 1:  # ALIGN divides H*W: constant over a vector
        row_mask = tl.max_constancy(row_mask, [ALIGN])
    return outer, rows, row_mask, c0, offs_c, mask_c, channels


@triton.jit
def tile_offsets(tile, strides, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr, INT64: tl.constexpr):
    """Element offsets of a rows-walk tile of a tensor with these ``(outer, inner, channel)`` strides. ALIGN divides
    every stride across the contiguous dimension and the tile's first row (or channel), so each run along it
    starts aligned: said to the compiler on the offsets, since a hint on a kernel argument does not reach it."""
    outer, rows, _row_mask, _c0, offs_c, _mask_c, _channels = tile
    stride_outer, stride_inner, stride_channel = strides
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
def slab(tile, stride_outer, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SLAB_INNER: tl.constexpr,
         ALIGN: tl.constexpr, INT64: tl.constexpr):
    """A slab-walk tile as a flat run: its first element, the flat indices, and which of them exist. The
    channels of one sample are contiguous in NCHW, so channels c0 .. c0 + BLOCK_C of sample ``outer`` are one
    run of up to BLOCK_C * SLAB_INNER elements. ALIGN divides the sample strides and the channel count, and is
    at most BLOCK_C: the run starts aligned and its length is a multiple of ALIGN."""
    outer, _rows, _row_mask, c0, _offs_c, _mask_c, channels = tile
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


# A tile's position, as kernels pass it: ``chunk_tile``'s tuple; an operand's strides: ``(outer, inner,
# channel)``. The walk's constexprs stay separate arguments: a constexpr read back from a tuple is no longer one to
# the compiler (the interpreter does not mind), and tile sizes must be.

@triton.jit
def load_tile(ptr, strides, tile, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
              CHANNELS_LAST: tl.constexpr, SLAB_INNER: tl.constexpr, ALIGN: tl.constexpr, INT64: tl.constexpr):
    """A ``[BLOCK_R, BLOCK_C]`` tile in the accumulator dtype, 0 where rows or channels do not exist."""
    _outer, _rows, row_mask, _c0, _offs_c, mask_c, _channels = tile
    mask = row_mask[:, None] & mask_c[None, :]
    if SLAB_INNER > 0:
        start, flat, present = slab(tile, strides[0], BLOCK_R, BLOCK_C, SLAB_INNER, ALIGN, INT64)
        values = tl.load(ptr + start + flat, mask=present, other=0.0).to(ACC)
        # Regroup in registers: element (row r, channel c) of the tile is element c * H*W + r of the run.
        index = tl.arange(0, BLOCK_C)[None, :] * SLAB_INNER + tl.minimum(tl.arange(0, BLOCK_R)[:, None],
                                                                        SLAB_INNER - 1)
        values = tl.reshape(tl.gather(values, tl.reshape(index, [BLOCK_R * BLOCK_C]), 0), [BLOCK_R, BLOCK_C])
        values = tl.where(mask, values, 0.0)
    else:
        values = tl.load(ptr + tile_offsets(tile, strides, CHANNELS_LAST, ALIGN, INT64), mask=mask,
                         other=0.0).to(ACC)
    return values


@triton.jit
def store_tile(ptr, values, strides, tile, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
               CHANNELS_LAST: tl.constexpr, SLAB_INNER: tl.constexpr, ALIGN: tl.constexpr, INT64: tl.constexpr):
    """Store a ``[BLOCK_R, BLOCK_C]`` tile (converted to ptr's dtype) where its rows and channels exist."""
    _outer, _rows, row_mask, _c0, _offs_c, mask_c, _channels = tile
    if SLAB_INNER > 0:
        start, flat, present = slab(tile, strides[0], BLOCK_R, BLOCK_C, SLAB_INNER, ALIGN, INT64)
        channel = flat // SLAB_INNER
        row = flat - channel * SLAB_INNER
        flat_values = tl.gather(tl.reshape(values, [BLOCK_R * BLOCK_C]),
                                row * BLOCK_C + tl.minimum(channel, BLOCK_C - 1), 0)
        tl.store(ptr + start + flat, flat_values.to(ptr.dtype.element_ty), mask=present)
    else:
        tl.store(ptr + tile_offsets(tile, strides, CHANNELS_LAST, ALIGN, INT64),
                 values.to(ptr.dtype.element_ty), mask=row_mask[:, None] & mask_c[None, :])


@triton.jit
def load_vector(vector, offs_c, mask_c, other, ACC: tl.constexpr, INT64: tl.constexpr):
    """A per-channel vector ``(pointer, stride)``, read through its stride."""
    ptr, stride = vector
    if INT64:
        offs_c = offs_c.to(tl.int64)
    return tl.load(ptr + offs_c * stride, mask=mask_c, other=other).to(ACC)


@triton.jit
def store_vector(vector, value, offs_c, mask_c, INT64: tl.constexpr):
    ptr, stride = vector
    if INT64:
        offs_c = offs_c.to(tl.int64)
    tl.store(ptr + offs_c * stride, value.to(ptr.dtype.element_ty), mask=mask_c)


# ----------------------------------------------------------------------------------------------------------
# Merging partial rows: the last program of a channel block to finish merges every split's row, in split order.
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def last_to_finish(ticket_ptr, programs):
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
def chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan et al.: the count, mean and sum of squared deviations of two disjoint sets. Deviations are always
    taken from a mean, so there is no E[x^2] - E[x]^2 cancellation. An empty pair merges to zeros."""
    count = count_a + count_b
    fraction = count_b / tl.maximum(count, 1.0)
    delta = mean_b - mean_a
    return count, mean_a + delta * fraction, m2_a + m2_b + delta * delta * count_a * fraction


@triton.jit
def merge_statistics(partial_ptr, splits, channels, offs_c, mask_c, ACC: tl.constexpr, BLOCK_S: tl.constexpr,
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
        count, mean, m2 = chan_merge(count, mean, m2, block_count, block_mean, block_m2)
    return count, mean, m2


@triton.jit
def merge_sums(partial_ptr, splits, channels, offs_c, mask_c, ACC: tl.constexpr, BLOCK_S: tl.constexpr,
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
def channel_affine(mean, var, weight, bias, eps, offs_c, mask_c, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                   ACC: tl.constexpr, INT64: tl.constexpr):
    """Per-channel ``scale, offset, mean, invstd`` such that ``bn(x) = (x - mean) * scale + offset``
    (``normalized``): subtracting the mean first keeps the digits of a channel whose values sit far from 0 with a
    small spread, which ``x * scale - mean * scale`` would cancel, as eager's ``(x - mean) * invstd`` keeps them.
    ``mean``, ``var``, ``weight``, ``bias``: per-channel vectors ``(pointer, stride)``; ``eps``: two fp32 parts.

    The forward and the backward both call this, so the pre-activation the backward recomputes is bit for bit
    the forward's."""
    mean = load_vector(mean, offs_c, mask_c, 0.0, ACC, INT64)
    var_eps = load_vector(var, offs_c, mask_c, 1.0, ACC, INT64) + from_fp32_parts(eps, ACC)
    if ACC == tl.float64:
        invstd = 1.0 / tl.sqrt(var_eps)  # IEEE for fp64; sqrt_rn exists for fp32 only
    else:
        invstd = 1.0 / tl.sqrt_rn(var_eps)
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * load_vector(weight, offs_c, mask_c, 1.0, ACC, INT64)
    offset = load_vector(bias, offs_c, mask_c, 0.0, ACC, INT64) if HAS_BIAS else tl.zeros_like(mean)
    return scale, offset, mean, invstd


@triton.jit
def normalized(x, mean, scale, offset):
    """bn(x) from ``channel_affine``'s per-channel vectors, the same arithmetic in every kernel."""
    return (x - mean[None, :]) * scale[None, :] + offset[None, :]


@triton.jit
def move_running_statistics(running_mean, running_var, num_batches_tracked_ptr, momentum, mean, var, n, offs_c,
                            mask_c, CUMULATIVE: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr):
    """running = (1 - f) running + f batch, with the batch's unbiased variance over ``n`` values, as eager computes
    it; f = momentum (two fp32 parts), or 1 / num_batches_tracked read on the device. The running statistics are
    per-channel vectors ``(pointer, stride)``."""
    if CUMULATIVE:
        factor = 1.0 / tl.load(num_batches_tracked_ptr).to(ACC)
    else:
        factor = from_fp32_parts(momentum, ACC)
    unbiased = var * (n / (n - 1.0))
    old_mean = load_vector(running_mean, offs_c, mask_c, 0.0, ACC, INT64)
    old_var = load_vector(running_var, offs_c, mask_c, 0.0, ACC, INT64)
    # eager's form: an infinite running value stays infinite ((b - r) would make it NaN)
    store_vector(running_mean, (1.0 - factor) * old_mean + factor * mean, offs_c, mask_c, INT64)
    store_vector(running_var, (1.0 - factor) * old_var + factor * unbiased, offs_c, mask_c, INT64)
