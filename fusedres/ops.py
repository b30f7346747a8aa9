"""The op layer: registered ops (``torch.library``), their fake functions and autograd, and the backend choice.

Registered ops, all under the ``fusedres`` namespace:
  batch_norm_stats_(input, running_mean!?, running_var!?, momentum, num_batches_tracked?) -> (mean, var)
      batch statistics; moves the running statistics in place                       one launch
  batch_norm_act(input, residual?, weight?, bias?, mean, var, training, eps) -> output
      relu(batch_norm(input) [+ residual]) with the given statistics; differentiable one launch
  batch_norm_act_backward(...) -> (grad_input, grad_residual, grad_weight, grad_bias)  two launches (one in eval)
  add_relu(input, residual) -> output          relu(input + residual); differentiable   one launch
  relu_backward(grad_output, output) -> grad                                             one launch

torch.library refuses autograd on an op that mutates its arguments, so the statistics op (which updates the
running statistics) is not differentiable and the differentiable op is functional: its backward differentiates
through the batch statistics it was given.

Backend: CUDA tensors run the Triton kernels on their own device; CPU tensors run eager PyTorch, unless the
process runs Triton's interpreter, in which case the kernels run on the CPU. ``FUSEDRES_DISABLE=1`` or
``with fusedres.disabled():`` force eager PyTorch everywhere.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import INTERPRETING, recording_only
from .kernels import add_relu as add_relu_launchers
from .kernels import batch_norm as batch_norm_launchers

_disabled = os.environ.get("FUSEDRES_DISABLE", "0") not in ("", "0")


@contextlib.contextmanager
def disabled(flag: bool = True):
    """Force the eager PyTorch path inside the block (``disabled(False)`` re-enables the kernels)."""
    global _disabled
    previous, _disabled = _disabled, flag
    try:
        yield
    finally:
        _disabled = previous


def is_disabled() -> bool:
    return _disabled


def uses_kernels(t: Tensor) -> bool:
    """Whether an op on ``t`` runs the Triton kernels (else eager PyTorch)."""
    return not _disabled and (t.is_cuda or INTERPRETING)


def _on_device(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _require_kernels(name: str, t: Tensor) -> None:
    # Meta tensors too while launches are only recorded (the kernel report and the ahead-of-time compilation).
    if not (t.is_cuda or INTERPRETING or (t.is_meta and recording_only())):
        raise RuntimeError(f"fusedres::{name}: the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1), "
                           f"got a tensor on {t.device}; call fusedres.functional, which runs eager PyTorch there")


def _memory_format(t: Tensor) -> torch.memory_format:
    """The format eager PyTorch gives this tensor's batch-norm output (its suggested memory format)."""
    if t.dim() != 4 or t.is_contiguous():
        return torch.contiguous_format
    if t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    n, c, h, w = t.stride()
    return torch.channels_last if c < w <= h <= n else torch.contiguous_format


def _dense(t: Tensor) -> Tensor:
    """``t`` itself if it is dense in NCHW or channels_last format, else a copy in its suggested format."""
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return t
    return t.contiguous(memory_format=_memory_format(t))


def _laid_out_like(t: Tensor, like: Tensor) -> Tensor:
    """``t`` with exactly ``like``'s strides (copied only if needed), keeping t's dtype."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


def _stats_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _result_dtype(input: Tensor, residual: Optional[Tensor]) -> torch.dtype:
    return input.dtype if residual is None else torch.promote_types(input.dtype, residual.dtype)


# ---------------------------------------------------------------------------------------------------------
# batch_norm_act
# ---------------------------------------------------------------------------------------------------------

def batch_norm_stats_kernels(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                             momentum: float, num_batches_tracked: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """The batch mean and biased variance per channel; with running statistics, also moves them toward the
    batch's in place (unbiased variance; factor ``momentum``, or ``1 / num_batches_tracked`` when that tensor is
    given: nn.BatchNorm2d's momentum=None). Not differentiable: batch_norm_act's backward differentiates through
    the statistics. It runs before the op that saves tensors for backward, as eager's native_batch_norm updates
    the running statistics in the op that saves, so checkpointing's recomputation updates them as eager does."""
    _require_kernels("batch_norm_stats_", input)
    x = _dense(input)
    new_stats = torch.empty if x.numel() else torch.zeros  # the statistics pass writes every channel
    mean = new_stats((x.shape[1],), dtype=_stats_dtype(x), device=x.device)
    var = new_stats((x.shape[1],), dtype=_stats_dtype(x), device=x.device)
    if x.numel() == 0:
        return mean, var  # the empty batch leaves the running statistics as they are, as eager does
    with _on_device(x):
        batch_norm_launchers.bn_batch_stats(x, mean, var, running_mean, running_var, momentum=momentum,
                                            num_batches_tracked=num_batches_tracked)
    return mean, var


_batch_norm_stats = torch.library.custom_op("fusedres::batch_norm_stats_", batch_norm_stats_kernels,
                                            mutates_args=("running_mean", "running_var"))


@_batch_norm_stats.register_fake
def _(input, running_mean, running_var, momentum, num_batches_tracked):
    return (input.new_empty((input.shape[1],), dtype=_stats_dtype(input)),
            input.new_empty((input.shape[1],), dtype=_stats_dtype(input)))


def batch_norm_act_kernels(input: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                           bias: Optional[Tensor], mean: Tensor, var: Tensor, training: bool, eps: float) -> Tensor:
    """relu(batch_norm(input) [+ residual]) with the given statistics: the batch's (from batch_norm_stats_) when
    ``training``, which the backward then differentiates through, else the running ones."""
    _require_kernels("batch_norm_act", input)
    x = _dense(input)
    y = torch.empty_like(x, dtype=_result_dtype(input, residual))
    if x.numel() == 0:
        return y
    if residual is not None and not batch_norm_launchers.walkable(x, residual):
        residual = _laid_out_like(residual, x)
    with _on_device(x):
        batch_norm_launchers.bn_act_apply(x, residual, mean, var, weight, bias, eps, y)
    return y


_batch_norm_act = torch.library.custom_op("fusedres::batch_norm_act", batch_norm_act_kernels, mutates_args=())


@_batch_norm_act.register_fake
def _(input, residual, weight, bias, mean, var, training, eps):
    return torch.empty_like(_dense(input), dtype=_result_dtype(input, residual))


def batch_norm_act_backward_kernels(grad_output: Tensor, input: Tensor, output: Optional[Tensor],
                                    weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, var: Tensor,
                                    training: bool, eps: float, output_mask: list[bool]
                                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of batch_norm_act for (input, residual, weight, bias); those not asked for by
    ``output_mask`` come back empty. ``output`` is given when a residual was added: the ReLU mask is then
    ``output > 0``, else it is recomputed from the input. ``mean``/``var`` are the statistics the forward used."""
    _require_kernels("batch_norm_act_backward", input)
    want_x, want_residual, want_weight, want_bias = output_mask
    x = _dense(input)
    grad_x, grad_z, grad_weight, grad_bias = _backward_outputs(x, output, weight, bias, output_mask)
    if x.numel() == 0:
        return grad_x, grad_z, grad_weight.zero_(), grad_bias.zero_()
    like = output if output is not None else x
    grad_y = grad_output if batch_norm_launchers.walkable(x, grad_output) else _laid_out_like(grad_output, like)
    sums = torch.empty((2, x.shape[1]), dtype=_stats_dtype(x), device=x.device)
    # Training with a residual: dz is written by the reduction and read by the dx pass.
    keep_grad_z = output is not None and (want_residual or (training and want_x))
    if keep_grad_z and grad_z.numel() == 0:
        grad_z = torch.empty_like(output)
    with _on_device(x):
        batch_norm_launchers.bn_act_backward_reduce(
            grad_y, x, output, mean, var, weight, bias, eps, sums_out=sums,
            grad_z_out=grad_z if keep_grad_z else None,
            grad_x_out=grad_x if (want_x and not training) else None,
            grad_weight_out=grad_weight if want_weight else None,
            grad_bias_out=grad_bias if want_bias else None, need_sums=training and want_x)
        if want_x and training:
            batch_norm_launchers.bn_backward_dx(grad_z if output is not None else grad_y, x, mean, var, weight,
                                                bias, eps, sums, grad_is_dy=output is None, grad_x_out=grad_x)
    if not want_residual:
        grad_z = grad_z.new_empty(0)
    return grad_x, grad_z, grad_weight, grad_bias


def _backward_outputs(x, output, weight, bias, output_mask):
    """The gradient tensors batch_norm_act_backward returns (empty where not asked for; parameter gradients
    contiguous, whatever the parameters' strides)."""
    want_x, want_residual, want_weight, want_bias = output_mask
    return (torch.empty_like(x) if want_x else x.new_empty(0),  # outputs may not alias: one empty each
            torch.empty_like(output) if (want_residual and output is not None) else x.new_empty(0),
            x.new_empty(weight.shape, dtype=weight.dtype) if (want_weight and weight is not None) else x.new_empty(0),
            x.new_empty(bias.shape, dtype=bias.dtype) if (want_bias and bias is not None) else x.new_empty(0))


_batch_norm_act_backward = torch.library.custom_op("fusedres::batch_norm_act_backward",
                                                   batch_norm_act_backward_kernels, mutates_args=())


@_batch_norm_act_backward.register_fake
def _(grad_output, input, output, weight, bias, mean, var, training, eps, output_mask):
    return _backward_outputs(_dense(input), output, weight, bias, output_mask)


def _batch_norm_act_setup_context(ctx, inputs, output):
    input, residual, weight, bias, mean, var, training, eps = inputs
    ctx.save_for_backward(input, output if residual is not None else None, weight, bias, mean, var)
    ctx.training, ctx.eps = training, eps
    ctx.residual_dtype = None if residual is None else residual.dtype


def _batch_norm_act_autograd(ctx, grad_y):
    input, y, weight, bias, mean, var = ctx.saved_tensors
    needs = ctx.needs_input_grad
    output_mask = [needs[0], needs[1] and y is not None, needs[2] and weight is not None,
                   needs[3] and bias is not None]
    grad_x, grad_residual, grad_weight, grad_bias = torch.ops.fusedres.batch_norm_act_backward(
        grad_y, input, y, weight, bias, mean, var, ctx.training, ctx.eps, output_mask)
    return (grad_x if output_mask[0] else None,
            grad_residual.to(ctx.residual_dtype) if output_mask[1] else None,
            grad_weight if output_mask[2] else None,
            grad_bias if output_mask[3] else None,
            None, None, None, None)


_batch_norm_act.register_autograd(_batch_norm_act_autograd, setup_context=_batch_norm_act_setup_context)


# ---------------------------------------------------------------------------------------------------------
# add_relu
# ---------------------------------------------------------------------------------------------------------

def add_relu_kernels(input: Tensor, residual: Tensor) -> Tensor:
    """relu(input + residual), in the promoted dtype and the layout eager gives."""
    _require_kernels("add_relu", input)
    y = torch.empty_like(input, dtype=_result_dtype(input, residual))  # eager's layout for input + residual
    if y.numel() == 0:
        return y
    with _on_device(y):
        add_relu_launchers.add_relu_forward(_laid_out_like(input, y), _laid_out_like(residual, y), y)
    return y


_add_relu = torch.library.custom_op("fusedres::add_relu", add_relu_kernels, mutates_args=())


@_add_relu.register_fake
def _(input, residual):
    return torch.empty_like(input, dtype=_result_dtype(input, residual))


def relu_backward_kernels(grad_output: Tensor, output: Tensor) -> Tensor:
    """grad_output where output > 0, else 0; in output's layout and dtype."""
    _require_kernels("relu_backward", output)
    grad = torch.empty_like(output)
    if grad.numel() == 0:
        return grad
    with _on_device(output):
        add_relu_launchers.relu_backward(_laid_out_like(grad_output, output), output, grad)
    return grad


_relu_backward = torch.library.custom_op("fusedres::relu_backward", relu_backward_kernels, mutates_args=())


@_relu_backward.register_fake
def _(grad_output, output):
    return torch.empty_like(output)


def _add_relu_setup_context(ctx, inputs, output):
    input, residual = inputs
    ctx.save_for_backward(output)
    ctx.dtypes = (input.dtype, residual.dtype)


def _add_relu_autograd(ctx, grad_y):
    (y,) = ctx.saved_tensors
    grad = torch.ops.fusedres.relu_backward(grad_y, y)
    # One gradient serves both summands (3e in all); a summand of another dtype gets its own cast.
    return tuple(grad.to(dtype) if needed else None for dtype, needed in zip(ctx.dtypes, ctx.needs_input_grad))


_add_relu.register_autograd(_add_relu_autograd, setup_context=_add_relu_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fusedres: double backward (differentiating a fusedres backward, e.g. with "
                       "create_graph=True) is not supported; run the model under fusedres.disabled() for that")


for _backward_op in (_batch_norm_act_backward, _relu_backward):
    _backward_op.register_autograd(_no_double_backward)


# ---------------------------------------------------------------------------------------------------------
# Python entry points used by fusedres.functional: backend choice, then the registered ops.
# ---------------------------------------------------------------------------------------------------------

def batch_norm_act(input: Tensor, residual: Optional[Tensor], running_mean: Optional[Tensor],
                   running_var: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                   training: bool, momentum: float, eps: float,
                   num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """relu(batch_norm(input) [+ residual]); updates the running statistics in place when training.

    ``num_batches_tracked`` (already incremented) selects the cumulative average (nn.BatchNorm2d's
    momentum=None); ``momentum`` is then ignored."""
    if not uses_kernels(input) or input.numel() == 0:  # an empty batch launches nothing: eager's own path
        if num_batches_tracked is not None:
            momentum = 1.0 / float(num_batches_tracked)
        y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return torch.relu(y if residual is None else y + residual)
    if training:
        # The statistics are not differentiated through this op (batch_norm_act's backward does it).
        mean, var = torch.ops.fusedres.batch_norm_stats_(input.detach(), running_mean, running_var, momentum,
                                                         num_batches_tracked)
    else:
        mean, var = running_mean, running_var
    return torch.ops.fusedres.batch_norm_act(input, residual, weight, bias, mean, var, training, eps)


def add_relu(input: Tensor, residual: Tensor) -> Tensor:
    """relu(input + residual)."""
    if not uses_kernels(input):
        return torch.relu(input + residual)
    return torch.ops.fusedres.add_relu(input, residual)
