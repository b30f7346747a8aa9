"""The walk and the launch plumbing shared by the kernels: how a kernel walks a tensor (``ChannelGeometry``,
``TilePlan``, ``plan_tiles``, the kernel arguments that describe it), every launch constant, the 64-bit offset
switch, scratch and the ticket counters of the last-program merges, and the launch hook.

How a kernel walks an (N, C, H, W) tensor (any rank from 2: the spatial dims flattened, so H*W stands for their
product): as ``outer x inner`` rows of ``channels`` columns. A channels_last tensor is one ``[N*H*W, C]`` matrix
(outer = 1), an NCHW tensor is ``N`` blocks of ``H*W`` contiguous rows per channel (outer = N). Every operand
carries its own (outer, inner, channel) strides, so a tensor in the other layout, or an expanded gradient, is read
through its strides. A program covers one block of channels and one
*split* of the chunks (a chunk being one ``block_rows`` run of rows inside one outer block), one tile at a time.

Two ways of reading a tile (docs/design.md, "Access width"):
- rows: a ``[block_rows, block_channels]`` tile of pointers, vectorised along the contiguous dimension when its
  strides are known multiples of the vector (the JIT hints multiples of 16; ``align`` hints the rest);
- slab (NCHW when ``H*W`` rows cannot be read full-width, e.g. 7x7 or 14x14): a sample's ``[block_channels, H*W]``
  slab is contiguous, so it is read as one flat run, full-width, and regrouped into the same tile in registers.

The launch constants are chosen from the shape only, so the reduction order, and with it every bit of the
result, is the same in any process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

# Triton reads TRITON_INTERPRET when it is imported; so do we.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

_INT32_LIMIT = 2**31
_force_int64 = False
_poison_scratch = False
_observers: list = []


@dataclass(frozen=True)
class LaunchConstants:
    """Every tuning constant of the kernels, in one place."""

    tile_elements: int       # elements of one batch-norm tile (the unit of work of a loop trip)
    busy_tile_elements: int  # the tile of a kernel holding four activation tiles at once (eval backward, residual)
    target_programs: int     # programs a batch-norm launch aims for (channel blocks x splits)
    max_splits: int          # at most this many partial rows per channel block: its last program merges them alone
    row_bytes: int           # channels_last: bytes of one row of a tile (channels per tile = row_bytes / itemsize)
    merge_block_splits: int  # partial rows the merging program reads per step, at least
    flat_block: int          # elements per program of the add + ReLU kernels
    slab_max_inner: int      # NCHW: largest H*W read as slabs (a slab's channel block must fill a tile)
    max_block_rows: int = 1024   # NCHW rows walk: the most rows of one channel in a tile (the rest: more channels)
    ranks_block_channels: int = 128  # channels per program of the merge of several ranks' statistics
    small_num_warps: int = 4     # warps of a small tile (under 2048 elements) and of the per-channel kernels
    large_num_warps: int = 8     # warps of a tile of 2048 elements or more

    def num_warps(self, tile_elements: int) -> int:
        return self.large_num_warps if tile_elements >= 2048 else self.small_num_warps


# GPU: about four programs per SM of an H100 (132 SMs) at 8 warps; at most 128 partial rows, so the serial merge
# reads 128 x 32 x 12 bytes at most (a few hundred nanoseconds from L2). Interpreter: every program costs about a
# millisecond, so as few as possible: wide channels_last tiles (512 fp64 channels) and few splits.
GPU_CONSTANTS = LaunchConstants(tile_elements=4096, busy_tile_elements=2048, target_programs=512, max_splits=128,
                                row_bytes=64, merge_block_splits=64, flat_block=2048, slab_max_inner=1024)
INTERPRETER_CONSTANTS = LaunchConstants(tile_elements=4096, busy_tile_elements=4096, target_programs=4, max_splits=4,
                                        row_bytes=4096, merge_block_splits=64, flat_block=1024, slab_max_inner=1024)
CONSTANTS = INTERPRETER_CONSTANTS if INTERPRETING else GPU_CONSTANTS


@contextlib.contextmanager
def overridden_constants(**changes):
    """Other launch constants inside the block (for tests: one split, many splits, tiny tiles)."""
    global CONSTANTS
    previous, CONSTANTS = CONSTANTS, dataclasses.replace(CONSTANTS, **changes)
    try:
        yield
    finally:
        CONSTANTS = previous


@contextlib.contextmanager
def forced_int64():
    """Run the 64-bit offset path even on small tensors (for tests)."""
    global _force_int64
    previous, _force_int64 = _force_int64, True
    try:
        yield
    finally:
        _force_int64 = previous


@contextlib.contextmanager
def poisoned_scratch():
    """Fill every launch's scratch (the partial rows of the last-program merges) with NaN before the launch, so
    that a merge reading a row its writer has not stored yet shows NaN instead of the bits of an earlier call that
    the caching allocator happened to hand back (for tests; the suite runs under it)."""
    global _poison_scratch
    previous, _poison_scratch = _poison_scratch, True
    try:
        yield
    finally:
        _poison_scratch = previous


def scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Per-launch scratch: every element is written by the launch before it is read (NaN-filled under
    ``poisoned_scratch``)."""
    buffer = torch.empty(shape, dtype=dtype, device=device)
    return buffer.fill_(float("nan")) if _poison_scratch and buffer.dtype.is_floating_point else buffer


@contextlib.contextmanager
def recorded_launches(*, run: bool = False):
    """Record ``(kernel, arguments, num_warps)`` for every launch. Without ``run`` the launches are recorded
    instead of run (for the ahead-of-time compilation and the kernel report, which work on meta tensors without a
    GPU); with it they also run (for counting launches per op)."""
    launches: list = []
    observer = (launches, run)
    _observers.append(observer)
    try:
        yield launches
    finally:
        _observers.remove(observer)


def recording_only() -> bool:
    """Whether launches are being recorded without running (meta tensors are then welcome)."""
    return any(not runs for _, runs in _observers)


def launch(kernel, grid: tuple[int, ...], args: dict, num_warps: int) -> None:
    run = True
    for launches, runs in _observers:
        launches.append((kernel, dict(args), num_warps))
        run = run and runs
    if run:
        kernel[grid](**args, num_warps=num_warps)


def needs_int64(*tensors: torch.Tensor | None) -> bool:
    """Whether some element offset of these tensors reaches 2**31 (then offsets are computed in int64)."""
    if _force_int64:
        return True
    for t in tensors:
        if t is not None and t.numel() > 0:
            span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
            if span + 1 >= _INT32_LIMIT or t.numel() >= _INT32_LIMIT:
                return True
    return False


def is_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill its span exactly once, in some order of its dimensions."""
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def fp32_parts(value: float) -> tuple[float, float]:
    """``value`` as ``hi + lo``, both exact in fp32: Triton passes float arguments as fp32, and an fp64
    kernel sums the parts back to (nearly) the full double."""
    hi = float(np.float32(value))
    return hi, float(np.float32(value - hi))


@triton.jit
def from_fp32_parts(parts, ACC: tl.constexpr):
    """The device half of ``fp32_parts``: a float argument passed as two fp32 parts (float arguments are fp32),
    summed in the accumulator dtype, so that fp64 kernels get the full value."""
    value, residue = parts
    return tl.cast(value, ACC) + tl.cast(residue, ACC)


def accumulator_dtype(dtype: torch.dtype):
    """fp64 inputs compute in fp64 (so gradcheck is meaningful), everything else in fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


_tickets: dict = {}


def ticket_counter_buffers() -> dict:
    """Every per-stream counter buffer made so far, by (device, stream): all zero between launches."""
    return dict(_tickets)


def ticket_counters(device: torch.device, count: int) -> torch.Tensor:
    """``count`` int32 counters, zero, for a launch whose programs take tickets (the last one merges). The kernels
    leave them at zero, so one buffer per stream serves every launch on it: launches on one stream never overlap,
    and launches on two streams never share counters. During CUDA-graph capture each launch gets fresh zeroed
    counters from the graph's pool, since a graph may be replayed on any stream."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(count, dtype=torch.int32, device=device)
        key = (device, torch.cuda.current_stream(device).cuda_stream)
    else:
        key = (device, None)
    counters = _tickets.get(key)
    if counters is None or counters.numel() < count:
        counters = torch.zeros(max(count, 256), dtype=torch.int32, device=device)
        _tickets[key] = counters
    return counters


def _collapsed_stride(sizes, strides) -> int | None:
    """The single stride that walks the given nested dims as one index, or None if there is none."""
    stride = None
    expected = None
    for size, s in reversed(list(zip(sizes, strides))):
        if size == 1:
            continue
        if stride is None:
            stride = s
        elif s != expected:
            return None
        expected = s * size
    return 0 if stride is None else stride


def _power_of_two_divisor(value: int, cap: int = 16) -> int:
    """The largest power of two, at most ``cap``, that divides ``value`` (0 is divided by everything)."""
    divisor = 1
    while divisor < cap and value % (divisor * 2) == 0:
        divisor *= 2
    return divisor


@dataclass(frozen=True)
class ChannelGeometry:
    """An ``(N, C, *spatial)`` tensor (any rank from 2: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``,
    ``(N, C, D, H, W)``) seen as ``outer`` blocks of ``inner`` rows of ``channels`` columns, the spatial dims
    flattened: channels-last (outer = 1, inner = N * spatial, the channels contiguous) or NCHW-style (outer = N,
    inner = spatial, each channel's values contiguous)."""

    outer: int
    inner: int
    channels: int
    channels_last: bool

    @staticmethod
    def of(x: torch.Tensor) -> "ChannelGeometry":
        """The geometry coalesced for ``x``, which must be dense NCHW-style (contiguous) or channels-last-style (dense
        in the order N, spatial..., C). Without spatial extent (``(N, C)``, or every spatial size 1) the two are the
        same memory and the channels-last walk is taken: rows of N samples, channels contiguous."""
        n, c = x.shape[:2]
        spatial = math.prod(x.shape[2:])
        channels_last = x.permute(0, *range(2, x.dim()), 1).is_contiguous()
        if channels_last and (spatial == 1 or not x.is_contiguous()):
            return ChannelGeometry(outer=1, inner=n * spatial, channels=c, channels_last=True)
        if not x.is_contiguous():
            raise ValueError(f"fusedres kernels: expected a dense tensor, NCHW-style or channels-last-style, got "
                             f"strides {tuple(x.stride())} for shape {tuple(x.shape)}")
        return ChannelGeometry(outer=n, inner=spatial, channels=c, channels_last=False)

    def strides(self, t: torch.Tensor) -> tuple[int, int, int] | None:
        """(outer, inner, channel) strides of ``t`` in this geometry, or None if its layout cannot be walked so."""
        sizes, strides = t.shape, t.stride()
        if self.channels_last:
            inner = _collapsed_stride((sizes[0], *sizes[2:]), (strides[0], *strides[2:]))
            return None if inner is None else (0, inner, strides[1])
        inner = _collapsed_stride(sizes[2:], strides[2:])
        return None if inner is None else (strides[0], inner, strides[1])

    def slab_strides(self, t: torch.Tensor) -> tuple[int, int, int] | None:
        """Strides of ``t`` if its channel slabs are contiguous as the slab walk reads them (NCHW, dense within a
        sample), else None."""
        strides = self.strides(t)
        if strides is None or self.channels_last:
            return None
        outer, inner, channel = strides
        return strides if (inner == 1 or self.inner == 1) and (channel == self.inner or self.channels == 1) else None


@dataclass(frozen=True)
class TilePlan:
    """A launch over a ChannelGeometry: tiles of ``block_rows x block_channels``, grid ``(channel_blocks,
    splits)``; split ``s`` handles chunks ``[s * chunks_per_split, ...)``. ``slab``: the tile is one sample's slab
    (``block_rows >= inner``, one chunk per sample), read flat."""

    block_rows: int
    block_channels: int
    num_warps: int
    inner_blocks: int
    chunks: int
    chunks_per_split: int
    splits: int
    channel_blocks: int
    slab: bool

    @property
    def grid(self) -> tuple[int, int]:
        return (self.channel_blocks, self.splits)

    @property
    def merge_block_splits(self) -> int:
        """Partial rows the merging program reads per step: enough that each thread reads four values of a row
        (a 128-bit fp32 vector), so that the merge is not made of scalar loads when channel blocks are narrow."""
        return max(CONSTANTS.merge_block_splits, 4 * 32 * self.num_warps // self.block_channels)


def plan_tiles(geometry: ChannelGeometry, itemsize: int, *, block_rows: int | None = None,
               block_channels: int | None = None, target_programs: int | None = None,
               slab: bool | None = None, tile_elements: int | None = None) -> TilePlan:
    """Choose the walk, the tiles and the split from the shape alone (deterministic). Explicit values are for
    tests that exercise masks, tails, merges of many splits, and both walks on the same shape, and for kernels
    that need a smaller tile (``tile_elements``) to stay within their registers."""
    if geometry.outer * geometry.inner * geometry.channels == 0:
        raise ValueError(f"fusedres kernels: nothing to launch over an empty tensor ({geometry}); the op layer "
                         f"handles empty inputs without kernels")
    k = CONSTANTS
    tile = tile_elements or k.tile_elements
    c_pow2 = triton.next_power_of_2(geometry.channels)
    i_pow2 = triton.next_power_of_2(geometry.inner)
    if slab and geometry.channels_last:
        raise ValueError("fusedres kernels: the slab walk reads NCHW tensors; this one is channels_last")
    if slab is None:
        slab = (not geometry.channels_last and (geometry.inner * itemsize) % 16 != 0
                and geometry.inner <= k.slab_max_inner)
    if slab:
        block_rows = i_pow2
        if block_channels is None:
            block_channels = min(c_pow2, max(1, tile // block_rows))
    else:
        if block_channels is None:
            if geometry.channels_last:  # a row of channels is the coalesced direction
                block_channels = min(c_pow2, max(1, k.row_bytes // itemsize))
            else:  # NCHW: the rows of a channel are; take several channels when a channel's rows are few
                block_channels = min(c_pow2, max(1, tile // min(i_pow2, k.max_block_rows)))
        if block_rows is None:
            block_rows = min(i_pow2, max(1, tile // block_channels))
    inner_blocks = triton.cdiv(geometry.inner, block_rows)
    chunks = geometry.outer * inner_blocks
    channel_blocks = triton.cdiv(geometry.channels, block_channels)
    if target_programs is None:
        wanted_splits = min(k.max_splits, triton.cdiv(k.target_programs, channel_blocks))
    else:
        wanted_splits = triton.cdiv(target_programs, channel_blocks)
    wanted_splits = max(1, min(chunks, wanted_splits))
    chunks_per_split = triton.cdiv(chunks, wanted_splits)
    splits = triton.cdiv(chunks, chunks_per_split)  # every split gets at least one chunk
    return TilePlan(block_rows, block_channels, k.num_warps(block_rows * block_channels), inner_blocks, chunks,
                    chunks_per_split, splits, channel_blocks, slab)


def stride_alignment(geometry: ChannelGeometry, plan: TilePlan, strides: list[tuple[int, int, int]]) -> int:
    """A power of two (at most 16) that the kernels may promise the compiler (``tl.multiple_of``) so that
    accesses along the contiguous dimension become vectors, beyond the multiples of 16 the JIT already hints: it
    divides, for every operand, each stride that moves across the contiguous dimension, and the extent along it
    (so that masks are constant over a vector), and the tile's extent along it (tiles start at multiples of it).
    Rows walk, channels_last: the row strides, the channel count and the channel block; NCHW: the sample and
    channel strides, H*W and the row block. Slab walk: the sample strides, the channel count and the channel
    block (a slab starts at a multiple of it)."""
    if plan.slab:
        values = [geometry.channels, plan.block_channels] + [outer for outer, _, _ in strides]
    elif geometry.channels_last:
        values = [geometry.channels, plan.block_channels] + [inner for _, inner, _ in strides]
    else:
        values = [geometry.inner, plan.block_rows] + [s for outer, _, channel in strides for s in (outer, channel)]
    return min(_power_of_two_divisor(v) for v in values)


def walk_args(geometry: ChannelGeometry, plan: TilePlan, operands: dict) -> dict:
    """The walk's kernel arguments: ``walk``, the runtime tuple ``(channels, inner, inner_blocks, chunks,
    chunks_per_split)``; every operand's ``<name>_strides``, ``(outer, inner, channel)``; the walk constexprs."""
    strides = {}
    for name, t in operands.items():
        if t is None:
            strides[name] = (0, 0, 0)
            continue
        strides[name] = geometry.slab_strides(t) if plan.slab else geometry.strides(t)
        if strides[name] is None:
            raise ValueError(f"fusedres kernels: {name} with strides {tuple(t.stride())} cannot be walked in the "
                             f"input's layout; make it dense in that layout first")
    return dict(walk=(geometry.channels, geometry.inner, plan.inner_blocks, plan.chunks, plan.chunks_per_split),
                **{f"{name}_strides": value for name, value in strides.items()},
                BLOCK_R=plan.block_rows, BLOCK_C=plan.block_channels, CHANNELS_LAST=geometry.channels_last,
                SLAB_INNER=geometry.inner if plan.slab else 0,
                ALIGN=stride_alignment(geometry, plan, list(strides.values())))


def vector_args(**vectors) -> dict:
    """Per-channel vectors as the kernels take them: ``(pointer, stride)`` (None: ``(None, 0)``, absent)."""
    return {name: (t, 0 if t is None else t.stride(0)) for name, t in vectors.items()}


def scalar_args(**scalars: float) -> dict:
    """Float arguments as the kernels take them: two fp32 parts (``fp32_parts``), which the kernels sum back in
    their accumulator dtype (``from_fp32_parts``)."""
    return {name: fp32_parts(value) for name, value in scalars.items()}
