"""Synchronized batch-norm + (add +) activation over torch.distributed: the op layer of ``SyncBatchNormAct2d``.

Training forward: each rank's statistics (count, mean, biased variance per channel) from the fused statistics
kernel, one all_gather of them (3·C values in fp64 per rank, so counts above 2**24 stay exact), the same Chan merge
in rank order on every rank (``bn_merge_ranks``: every rank holds bitwise the same statistics, and the running
statistics move with the global count in the same launch), then the fused normalize (+ add) + activation.
Backward: each rank's sum(dz) and sum(dz·x̂) from the fused reduce pass, one all_gather of them, summed, then the
fused dx pass with the global count. The weight and bias gradients are each rank's own sums, as nn.SyncBatchNorm's
are (DistributedDataParallel reduces them across ranks). Collectives go through torch.distributed on the tensors'
device (NCCL on CUDA, gloo on CPU); nothing synchronises with the host beyond what the collectives do.

Where the kernels do not run (CPU tensors outside Triton's interpreter, or ``fusedres.disabled()``), the same
computation is written in differentiable eager PyTorch, its collective ``torch.distributed.nn.functional``'s
differentiable all_gather.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import memory, ops
from .activations import eager_activation
from .kernels import batch_norm as batch_norm_launchers


def world_size(process_group) -> int:
    """The number of ranks a synchronized batch-norm averages over (1 without an initialised process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def _gather(values: Tensor, process_group) -> Tensor:
    """``[world, *values.shape]``: every rank's ``values``, in rank order (one collective)."""
    world = dist.get_world_size(process_group)
    gathered = values.new_empty((world * values.shape[0],) + tuple(values.shape[1:]))  # (gloo's form: concatenated)
    dist.all_gather_into_tensor(gathered, values.contiguous(), group=process_group)
    return gathered.view((world,) + tuple(values.shape))


def merge_statistics(gathered: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chan's merge of ``[world, 3, C]`` (count, mean, biased variance) rows in rank order: the global count, mean
    and biased variance per channel (eager PyTorch; the kernel path's is ``bn_merge_ranks``, the same merge).
    Empty ranks (count 0) merge to nothing."""
    count = mean = m2 = torch.zeros_like(gathered[0, 0])
    for rank in range(gathered.shape[0]):
        other_count, other_mean, other_var = gathered[rank].unbind(0)
        total = count + other_count
        fraction = other_count / total.clamp(min=1.0)
        delta = other_mean - mean
        m2 = m2 + other_var * other_count + delta * delta * count * fraction
        mean = mean + delta * fraction
        count = total
    return count, mean, m2 / count.clamp(min=1.0)


def _update_running(running_mean, running_var, mean, var, count, momentum, num_batches_tracked) -> None:
    """running = (1 - f) running + f batch, the unbiased variance from the global count, as eager computes it;
    f = momentum, or 1 / num_batches_tracked read on the device (no host sync); left as they are when every rank
    was empty. A global count of 1, which eager refuses (refusing it here would sync the host), has variance 0."""
    factor = 1.0 / num_batches_tracked.to(mean.dtype) if num_batches_tracked is not None else momentum
    factor = torch.where(count > 0, torch.as_tensor(factor, dtype=mean.dtype, device=mean.device), 0.0)
    n = count.clamp(min=2.0)
    with torch.no_grad():
        running_mean.copy_((1.0 - factor) * running_mean.to(mean.dtype) + factor * mean)
        running_var.copy_((1.0 - factor) * running_var.to(mean.dtype) + factor * (var * (n / (n - 1.0))))


def _local_statistics(x: Tensor) -> Tensor:
    """``[3, C]`` fp64: this rank's count, mean and biased variance per channel (zeros for an empty batch), from
    the statistics kernel (fp64 rows, so that counts above 2**24 stay exact in the exchange)."""
    channels = x.shape[1]
    values_per_channel = x.numel() // channels if channels else 0
    local = torch.full((3, channels), float(values_per_channel), dtype=torch.float64, device=x.device)
    if values_per_channel:
        with ops.on_device(x):
            batch_norm_launchers.bn_batch_stats(x, local[1], local[2])
    else:
        local[1:].zero_()
    return local


class _SyncBatchNormAct(torch.autograd.Function):
    """The kernels' synchronized forward and backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, input, residual, weight, bias, running_mean, running_var, momentum, eps, activation,
                negative_slope, num_batches_tracked, process_group):
        x = ops.dense(input)
        gathered = _gather(_local_statistics(x), process_group)
        channels = x.shape[1]
        mean = x.new_empty((channels,), dtype=ops.statistics_dtype(x))
        var = torch.empty_like(mean)
        count = x.new_empty((channels,), dtype=torch.float64)
        with ops.on_device(x):
            batch_norm_launchers.bn_merge_ranks(gathered, mean, var, count, running_mean, running_var,
                                                momentum=momentum, num_batches_tracked=num_batches_tracked)
        y = ops.run_batch_norm_act(x, residual, weight, bias, mean, var, True, eps, activation, negative_slope)
        ops.batch_norm_act_setup_context(ctx, (x, residual, weight, bias, mean, var, True, eps, activation,
                                                negative_slope), y)
        ctx.count, ctx.process_group = count, process_group
        ctx.mark_non_differentiable(*(t for t in (running_mean, running_var) if t is not None))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        def sums_to_means(sums):
            # Summed by one reduction (the same bits on every rank), divided by the global count on the device:
            # the dx pass takes per-channel means (count 1), since reading the count on the host would synchronise.
            return _gather(sums, ctx.process_group).sum(0).div_(ctx.count)  # (every rank empty: never read)

        backward = functools.partial(ops.batch_norm_act_backward_passes, sums_to_means=sums_to_means)
        return ops.batch_norm_act_gradients(ctx, grad_y, backward) + (None,) * 8


def _eager_sync_batch_norm_act(input, residual, weight, bias, running_mean, running_var, momentum, eps, activation,
                               negative_slope, num_batches_tracked, process_group) -> Tensor:
    """The same computation in differentiable eager PyTorch (CPU without the interpreter, or disabled)."""
    import torch.distributed.nn.functional as distributed_autograd

    channels = input.shape[1]
    dims = [d for d in range(input.dim()) if d != 1]
    count = input.numel() // channels if channels else 0
    stats_dtype = torch.float64
    if count:
        var, mean = torch.var_mean(input.to(stats_dtype), dim=dims, unbiased=False)
    else:
        mean = var = input.new_zeros(channels, dtype=stats_dtype) + input.sum() * 0  # (connected to the graph)
    local = torch.stack([torch.full_like(mean, float(count)).detach(), mean, var])
    gathered = torch.stack(distributed_autograd.all_gather(local, group=process_group))
    total, mean, var = merge_statistics(gathered)
    if running_mean is not None:
        _update_running(running_mean, running_var, mean.detach(), var.detach(), total, momentum, num_batches_tracked)
    shape = [1, channels] + [1] * (input.dim() - 2)
    compute = torch.promote_types(input.dtype, torch.float32)
    z = (input.to(compute) - mean.to(compute).view(shape)) * torch.rsqrt(var.to(compute).view(shape) + eps)
    if weight is not None:
        z = z * weight.to(compute).view(shape)
    if bias is not None:
        z = z + bias.to(compute).view(shape)
    out_dtype = input.dtype if residual is None else torch.promote_types(input.dtype, residual.dtype)
    z = z.to(out_dtype) if residual is None else z.to(out_dtype) + residual
    return eager_activation(activation, z, negative_slope)


def sync_batch_norm_act(input: Tensor, residual: Optional[Tensor], running_mean: Optional[Tensor],
                        running_var: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                        momentum: float, eps: float, activation: str, negative_slope: float,
                        num_batches_tracked: Optional[Tensor], process_group) -> Tensor:
    """act(batch_norm(input) [+ residual]) with the statistics of the whole process group's batch (training);
    updates the running statistics in place with the global count. Every rank must call it (a collective)."""
    if not ops.uses_kernels(input):
        return _eager_sync_batch_norm_act(input, residual, weight, bias, running_mean, running_var, momentum, eps,
                                          activation, negative_slope, num_batches_tracked, process_group)
    output = _SyncBatchNormAct.apply(input, residual, weight, bias, running_mean, running_var, momentum, eps,
                                     activation, float(negative_slope), num_batches_tracked, process_group)
    if residual is None:
        memory.mark_recomputable(output)
    return output
