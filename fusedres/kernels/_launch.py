"""Launch plumbing shared by the kernels.

How a kernel walks an (N, C, H, W) tensor: as ``outer x inner`` rows of ``channels`` columns. A channels_last
tensor is one ``[N*H*W, C]`` matrix (outer = 1), an NCHW tensor is ``N`` blocks of ``H*W`` contiguous rows per
channel (outer = N). Every operand carries its own (outer, inner, channel) strides, so a tensor in the other
layout, or an expanded gradient, is read through its strides.

Also here: the launch configurations (chosen from the shape only, so the reduction order, and with it every
bit of the result, is the same in any process), the 64-bit offset switch, and the launch hook through which
the ahead-of-time compilation test records every kernel variant instead of running it.
"""
from __future__ import annotations

import contextlib
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
_recorded_launches: list | None = None


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
def recorded_launches():
    """Record ``(kernel, arguments, num_warps)`` for every launch instead of running it (for the
    ahead-of-time compilation check, which runs without a GPU and without the interpreter)."""
    global _recorded_launches
    previous, _recorded_launches = _recorded_launches, []
    try:
        yield _recorded_launches
    finally:
        _recorded_launches = previous


def launch(kernel, grid: tuple[int, ...], args: dict, num_warps: int) -> None:
    if _recorded_launches is not None:
        _recorded_launches.append((kernel, dict(args), num_warps))
        return
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


def accumulator_dtype(dtype: torch.dtype):
    """fp64 inputs compute in fp64 (so gradcheck is meaningful), everything else in fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


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


@dataclass(frozen=True)
class ChannelGeometry:
    """An (N, C, H, W) tensor seen as ``outer`` blocks of ``inner`` rows of ``channels`` columns."""

    outer: int
    inner: int
    channels: int

    @staticmethod
    def of(x: torch.Tensor) -> "ChannelGeometry":
        """The geometry coalesced for ``x``, which must be dense in NCHW or channels_last format."""
        n, c, h, w = x.shape
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            return ChannelGeometry(outer=1, inner=n * h * w, channels=c)
        if not x.is_contiguous():
            raise ValueError(f"fusedres kernels: expected an NCHW or channels_last dense tensor, got strides "
                             f"{tuple(x.stride())} for shape {tuple(x.shape)}")
        return ChannelGeometry(outer=n, inner=h * w, channels=c)

    def strides(self, t: torch.Tensor) -> tuple[int, int, int] | None:
        """(outer, inner, channel) strides of ``t`` in this geometry, or None if its layout cannot be walked so."""
        n, c, h, w = t.shape
        if self.outer == 1:
            inner = _collapsed_stride((n, h, w), (t.stride(0), t.stride(2), t.stride(3)))
            return None if inner is None else (0, inner, t.stride(1))
        inner = _collapsed_stride((h, w), (t.stride(2), t.stride(3)))
        return None if inner is None else (t.stride(0), inner, t.stride(1))


@dataclass(frozen=True)
class TilePlan:
    """A launch over a ChannelGeometry: tiles of ``block_inner x block_channels``, grid
    ``(channel_blocks, splits)``; split ``s`` handles chunks ``[s * chunks_per_split, ...)``, a chunk being one
    ``block_inner`` run of rows inside one outer block."""

    block_inner: int
    block_channels: int
    num_warps: int
    inner_blocks: int
    chunks: int
    chunks_per_split: int
    splits: int
    channel_blocks: int

    @property
    def grid(self) -> tuple[int, int]:
        return (self.channel_blocks, self.splits)


# Programs to aim for: enough to fill an H100's 132 SMs several times over, few enough that the per-channel
# partial results of a reduction stay small. Under the interpreter every program costs about a millisecond.
_TARGET_PROGRAMS = 1024
_TARGET_PROGRAMS_INTERPRETED = 4
_TILE_ELEMENTS = 4096
_TILE_ELEMENTS_INTERPRETED = 4096


def plan_tiles(geometry: ChannelGeometry, channels_contiguous: bool, *, block_inner: int | None = None,
               block_channels: int | None = None, target_programs: int | None = None) -> TilePlan:
    """Choose tiles and the split from the shape alone (deterministic). Explicit block sizes are for tests
    that exercise masks and tails with small tiles."""
    if geometry.outer * geometry.inner * geometry.channels == 0:
        raise ValueError(f"fusedres kernels: nothing to launch over an empty tensor ({geometry}); the op layer "
                         f"handles empty inputs without kernels")
    tile = _TILE_ELEMENTS_INTERPRETED if INTERPRETING else _TILE_ELEMENTS
    if target_programs is None:
        target_programs = _TARGET_PROGRAMS_INTERPRETED if INTERPRETING else _TARGET_PROGRAMS
    c_pow2 = triton.next_power_of_2(max(geometry.channels, 1))
    i_pow2 = triton.next_power_of_2(max(geometry.inner, 1))
    if block_channels is None:
        if channels_contiguous:  # channels_last: a row of channels is the coalesced direction
            block_channels = min(c_pow2, 64)
        else:  # NCHW: the rows of a channel are; take several channels when a channel's rows are few
            block_channels = min(c_pow2, max(1, tile // min(i_pow2, 1024)))
    if block_inner is None:
        block_inner = min(i_pow2, max(1, tile // block_channels))
    inner_blocks = triton.cdiv(geometry.inner, block_inner)
    chunks = geometry.outer * inner_blocks
    channel_blocks = triton.cdiv(geometry.channels, block_channels)
    wanted_splits = max(1, min(chunks, triton.cdiv(target_programs, channel_blocks)))
    chunks_per_split = triton.cdiv(chunks, wanted_splits)
    splits = triton.cdiv(chunks, chunks_per_split)  # every split gets at least one chunk
    num_warps = 8 if block_inner * block_channels >= 4096 else 4
    return TilePlan(block_inner, block_channels, num_warps, inner_blocks, chunks, chunks_per_split, splits,
                    channel_blocks)
