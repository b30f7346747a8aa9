"""The batch-norm (+ residual add) + activation launchers: each takes its outputs as arguments, plans the walk
(``walk.py``), and launches one kernel (``batch_norm_forward.py``, ``batch_norm_backward.py``, made of
``tiles.py``'s pieces). Only per-launch scratch (partial rows) and the per-stream ticket counters are theirs.

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

Every kernel walks its tensors as ``walk.py`` describes: program ``(channel block, split)`` visits the chunks of
its split one ``[BLOCK_R, BLOCK_C]`` tile at a time (rows x channels). A reduction writes one partial row per
split; the last program of each channel block to finish merges the rows in split order (``tiles.last_to_finish``):
one launch, no float atomics, bitwise deterministic. Per-channel vectors are read through their own strides (a
column of a matrix, an expanded scalar).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import walk
from .activations import DERIVATIVE_FROM_OUTPUT, checked_activation
from .batch_norm_backward import bn_backward_dx_kernel, bn_backward_reduce_kernel
from .batch_norm_forward import bn_act_apply_kernel, bn_merge_ranks_kernel, bn_stats_kernel
from .walk import (ChannelGeometry, TilePlan, accumulator_dtype, launch, needs_int64, plan_tiles,
                   scalar_args, scratch, ticket_counters, vector_args, walk_args)

# ----------------------------------------------------------------------------------------------------------
# ``tiles`` (block_rows, block_channels, target_programs, slab) override the shape
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


def bn_act_apply(x, residual, mean, var, weight, bias, eps: float, out, *, activation: str = "relu",
                 slope: float = 0.0, **tiles) -> None:
    """out = act(batch_norm(x; mean, var, weight, bias) [+ residual])."""
    if x.numel() == 0:
        return
    geometry, plan = _plan(x, **tiles)
    launch(bn_act_apply_kernel, plan.grid, dict(
        x_ptr=x, residual_ptr=residual, y_ptr=out, **vector_args(mean=mean, var=var, weight=weight, bias=bias),
        **scalar_args(eps=eps, slope=slope), **walk_args(geometry, plan, dict(x=x, residual=residual, y=out)),
        ACTIVATION=checked_activation(activation), HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        # An fp64 residual makes an fp64 output: keep its precision, as eager's fp64 add does.
        ACC=accumulator_dtype(torch.promote_types(x.dtype, out.dtype)),
        INT64=needs_int64(x, residual, out, mean, var, weight, bias)), plan.num_warps)


def bn_batch_stats(x, mean_out, var_out, running_mean=None, running_var=None, *, momentum: float = 0.0,
                   num_batches_tracked=None, **tiles) -> None:
    """mean_out, var_out = per-channel mean and biased variance of x (accumulator dtype); with running statistics,
    also moves them toward the batch's, in place: factor ``momentum``, or ``1 / num_batches_tracked`` read on the
    device (momentum=None). One launch."""
    geometry, plan = _plan(x, **tiles)
    acc = accumulator_dtype(x.dtype)
    launch(bn_stats_kernel, plan.grid, dict(
        # partial rows in the accumulator's dtype (the merge's loop keeps one type), whatever mean_out's
        x_ptr=x, partial_ptr=scratch((3, plan.splits, geometry.channels),
                                     torch.float64 if acc == tl.float64 else torch.float32, x.device),
        ticket_ptr=ticket_counters(x.device, plan.channel_blocks), mean_ptr=mean_out, var_ptr=var_out,
        **vector_args(running_mean=running_mean, running_var=running_var),
        num_batches_tracked_ptr=num_batches_tracked, **scalar_args(momentum=momentum),
        count=geometry.outer * geometry.inner, **walk_args(geometry, plan, dict(x=x)),
        UPDATE_RUNNING=running_mean is not None, CUMULATIVE=num_batches_tracked is not None, ACC=acc,
        BLOCK_S=plan.merge_block_splits, INT64=needs_int64(x, running_mean, running_var)), plan.num_warps)


def bn_merge_ranks(gathered, mean_out, var_out, count_out, running_mean=None, running_var=None, *,
                   momentum: float = 0.0, num_batches_tracked=None) -> None:
    """A synchronized batch-norm's statistics from ``gathered``, every rank's ``[3, channels]`` (count, mean,
    biased variance) stacked in rank order (fp64): mean_out, var_out (the statistics dtype) and count_out (fp64) per
    channel; with running statistics, moves them as ``bn_batch_stats`` does, with the global count. One launch."""
    ranks, _, channels = gathered.shape
    block_c = walk.CONSTANTS.ranks_block_channels
    launch(bn_merge_ranks_kernel, (triton.cdiv(channels, block_c),), dict(
        gathered_ptr=gathered.contiguous(), ranks=ranks, mean_ptr=mean_out, var_ptr=var_out, count_ptr=count_out,
        **vector_args(running_mean=running_mean, running_var=running_var),
        num_batches_tracked_ptr=num_batches_tracked, **scalar_args(momentum=momentum),
        channels=channels, UPDATE_RUNNING=running_mean is not None, CUMULATIVE=num_batches_tracked is not None,
        BLOCK_C=block_c, INT64=needs_int64(running_mean, running_var)), walk.CONSTANTS.small_num_warps)


def bn_act_backward_reduce(grad_y, x, mean, var, weight, bias, eps: float, *, sums_out, activation: str = "relu",
                           slope: float = 0.0, output=None, residual=None, grad_z_out=None, grad_x_out=None,
                           grad_weight_out=None, grad_bias_out=None, need_sums: bool = True, **tiles) -> None:
    """dz = grad_y * act'(pre-activation) and, when ``need_sums``, ``sums_out`` = per-channel sum(dz) and
    sum(dz * xhat) (a ``[2, channels]`` tensor in the accumulator dtype), dbias and dweight. One launch.

    The pre-activation: from x alone (no residual was added), from the saved ``output`` (a residual was added and
    the activation is of the ReLU family), or from x and the ``residual``. Optionally writes dz (``grad_z_out``,
    with the output's or the residual's strides), dx = dz * weight * invstd (``grad_x_out``, x's strides: frozen
    statistics), and dweight / dbias (contiguous)."""
    activation = checked_activation(activation)
    if output is not None and residual is not None:
        raise ValueError("fusedres kernels: the pre-activation comes from the output or from the residual, not both")
    if output is not None and activation not in DERIVATIVE_FROM_OUTPUT:
        raise ValueError(f"fusedres kernels: {activation}'s derivative cannot be read from its output")
    pre = output if output is not None else residual
    geometry, plan = _plan(x, **tiles)
    if grad_x_out is not None and pre is not None and not plan.slab and "tile_elements" not in tiles:
        # x, dy, the pre-activation source and dz live at once: a smaller tile keeps them in registers (the slab
        # walk's regrouping through shared memory keeps fewer values live; ptxas spills there if the tile shrinks)
        geometry, plan = _plan(x, tile_elements=walk.CONSTANTS.busy_tile_elements, **tiles)
    if grad_z_out is not None and pre is not None and grad_z_out.stride() != pre.stride():
        raise ValueError("fusedres kernels: grad_z_out must have the strides of the output or residual it is read with")
    if grad_x_out is not None and grad_x_out.stride() != x.stride():
        raise ValueError("fusedres kernels: grad_x_out must have the input's strides")
    need_sums = need_sums or grad_weight_out is not None or grad_bias_out is not None
    launch(bn_backward_reduce_kernel, plan.grid, dict(
        grad_y_ptr=grad_y, x_ptr=x, pre_ptr=pre, grad_z_ptr=grad_z_out, grad_x_ptr=grad_x_out,
        **vector_args(mean=mean, var=var, weight=weight, bias=bias), **scalar_args(eps=eps, slope=slope),
        partial_ptr=scratch((2, plan.splits if need_sums else 0, geometry.channels), sums_out.dtype, x.device),
        ticket_ptr=ticket_counters(x.device, plan.channel_blocks), sums_ptr=sums_out,
        grad_weight_ptr=grad_weight_out, grad_bias_ptr=grad_bias_out,
        **walk_args(geometry, plan, dict(grad_y=grad_y, x=x, pre=pre if pre is not None else grad_z_out)),
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
    launch(bn_backward_dx_kernel, plan.grid, dict(
        grad_ptr=grad, x_ptr=x, grad_x_ptr=grad_x_out, **vector_args(mean=mean, var=var, weight=weight, bias=bias),
        **scalar_args(eps=eps, slope=slope), sums_ptr=sums,
        count=geometry.outer * geometry.inner if count is None else count,
        **walk_args(geometry, plan, dict(grad=grad, x=x, grad_x=grad_x_out)),
        ACTIVATION=checked_activation(activation), GRAD_IS_DY=grad_is_dy, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, ACC=accumulator_dtype(x.dtype),
        INT64=needs_int64(grad, x, grad_x_out, mean, var, weight, bias)), plan.num_warps)
