"""The op layer: registered ops (``torch.library``), their fake functions and autograd, and the backend choice.

Each registered op is a ``run_*`` function (checks the device, arranges layouts, allocates outputs, calls the
launchers of ``fusedres/kernels``), registered with ``torch.library``; ``dispatch_batch_norm_act`` and
``dispatch_add_act``, the entry points of the public functions and modules (validated by them), choose the backend
and call the registered ops.

Registered ops, all under the ``fusedres`` namespace:
  batch_norm_stats_(input, running_mean!?, running_var!?, momentum, num_batches_tracked?) -> (mean, var)
      batch statistics; moves the running statistics in place                                   one launch
  batch_norm_act(input, residual?, weight?, bias?, mean, var, training, eps, activation, negative_slope) -> output
      act(batch_norm(input) [+ residual]) with the given statistics; differentiable              one launch
  batch_norm_act_backward(...) -> (grad_input, grad_residual, grad_weight, grad_bias)  two launches (one in eval)
  add_act(input, residual, activation, negative_slope) -> output    act(input + residual); differentiable, one
  act_backward(grad_output, first, second?, activation, negative_slope) -> grad                  one launch

torch.library refuses autograd on an op that mutates its arguments, so the statistics op (which updates the
running statistics) is not differentiable and the differentiable op is functional: its backward differentiates
through the batch statistics it was given.

Backend: CUDA tensors run the Triton kernels on their own device; CPU tensors run eager PyTorch, unless the
process runs Triton's interpreter, in which case the kernels run on the CPU. ``FUSEDRES_DISABLE=1`` or
``with fusedres.disabled():`` force eager PyTorch everywhere; so do torch.func's transforms.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import memory
from .activations import DERIVATIVE_FROM_OUTPUT, eager_activation
from .kernels import INTERPRETING, recording_only
from .kernels import add_act as add_act_launchers
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
    """Whether an op on ``t`` runs the Triton kernels (else eager PyTorch). Not under torch.func's transforms
    (grad, vmap, jvp, jacrev...): torch.library builds the registered ops' autograd without their support, and
    eager PyTorch computes the same there."""
    return not _disabled and (t.is_cuda or INTERPRETING) and torch._C._functorch.peek_interpreter_stack() is None


def on_device(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _require_kernels(name: str, t: Tensor) -> None:
    # Meta tensors too while launches are only recorded (the kernel report and the ahead-of-time compilation).
    if not (t.is_cuda or INTERPRETING or (t.is_meta and recording_only())):
        raise RuntimeError(f"fusedres::{name}: the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1), "
                           f"got a tensor on {t.device}; call fusedres.functional, which runs eager PyTorch there")


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}  # the ranks that have a channels-last format


def _memory_format(t: Tensor) -> torch.memory_format:
    """The format eager PyTorch gives this tensor's batch-norm output (its suggested memory format): channels-last
    for a 4-D or 5-D tensor whose strides are ordered as that format's (channels innermost), else contiguous
    (always for 2-D and 3-D tensors, which have no channels-last format)."""
    channels_last = _CHANNELS_LAST.get(t.dim())
    if channels_last is None or t.is_contiguous():
        return torch.contiguous_format
    if t.is_contiguous(memory_format=channels_last):
        return channels_last
    n, c, *spatial = t.stride()
    ordered = c < spatial[-1] and all(inner <= outer for inner, outer in zip(spatial[1:], spatial)) and spatial[0] <= n
    return channels_last if ordered else torch.contiguous_format


def memory_format(dim: int, channels_last: bool) -> torch.memory_format:
    """The memory format of a ``dim``-D tensor laid out channels-last when ``channels_last``: torch.channels_last
    (4-D), torch.channels_last_3d (5-D); contiguous otherwise (a 2-D or 3-D tensor has no channels-last format)."""
    return _CHANNELS_LAST.get(dim, torch.contiguous_format) if channels_last else torch.contiguous_format


def dense(t: Tensor) -> Tensor:
    """``t`` itself if it is dense in the format eager gives its output (contiguous, or channels-last for 4-D and
    5-D), else a copy in its suggested format."""
    channels_last = _CHANNELS_LAST.get(t.dim())
    if t.is_contiguous() or (channels_last is not None and t.is_contiguous(memory_format=channels_last)):
        return t
    return t.contiguous(memory_format=_memory_format(t))


def _laid_out_like(t: Tensor, like: Tensor) -> Tensor:
    """``t`` with exactly ``like``'s strides (copied only if needed), keeping t's dtype."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


def statistics_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _result_dtype(input: Tensor, residual: Optional[Tensor]) -> torch.dtype:
    return input.dtype if residual is None else torch.promote_types(input.dtype, residual.dtype)


# ---------------------------------------------------------------------------------------------------------
# batch_norm_act
# ---------------------------------------------------------------------------------------------------------

def run_batch_norm_stats(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                             momentum: float, num_batches_tracked: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """The batch mean and biased variance per channel; with running statistics, also moves them toward the
    batch's in place (unbiased variance; factor ``momentum``, or ``1 / num_batches_tracked`` when that tensor is
    given: nn.BatchNorm2d's momentum=None). Not differentiable: batch_norm_act's backward differentiates through
    the statistics. It runs before the op that saves tensors for backward, as eager's native_batch_norm updates
    the running statistics in the op that saves, so checkpointing's recomputation updates them as eager does."""
    _require_kernels("batch_norm_stats_", input)
    x = dense(input)
    new_stats = torch.empty if x.numel() else torch.zeros  # the statistics pass writes every channel
    mean = new_stats((x.shape[1],), dtype=statistics_dtype(x), device=x.device)
    var = new_stats((x.shape[1],), dtype=statistics_dtype(x), device=x.device)
    if x.numel() == 0:
        return mean, var  # the empty batch leaves the running statistics as they are, as eager does
    with on_device(x):
        batch_norm_launchers.bn_batch_stats(x, mean, var, running_mean, running_var, momentum=momentum,
                                            num_batches_tracked=num_batches_tracked)
    return mean, var


_batch_norm_stats = torch.library.custom_op("fusedres::batch_norm_stats_", run_batch_norm_stats,
                                            mutates_args=("running_mean", "running_var"))


@_batch_norm_stats.register_fake
def _(input, running_mean, running_var, momentum, num_batches_tracked):
    return (input.new_empty((input.shape[1],), dtype=statistics_dtype(input)),
            input.new_empty((input.shape[1],), dtype=statistics_dtype(input)))


def run_batch_norm_act(input: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                           bias: Optional[Tensor], mean: Tensor, var: Tensor, training: bool, eps: float,
                           activation: str, negative_slope: float) -> Tensor:
    """act(batch_norm(input) [+ residual]) with the given statistics: the batch's (from batch_norm_stats_) when
    ``training``, which the backward then differentiates through, else the running ones."""
    _require_kernels("batch_norm_act", input)
    x = dense(input)
    y = torch.empty_like(x, dtype=_result_dtype(input, residual))
    if x.numel() == 0:
        return y
    if residual is not None and not batch_norm_launchers.walkable(x, residual):
        residual = _laid_out_like(residual, x)
    with on_device(x):
        batch_norm_launchers.bn_act_apply(x, residual, mean, var, weight, bias, eps, y, activation=activation,
                                          slope=negative_slope)
    return y


_batch_norm_act = torch.library.custom_op("fusedres::batch_norm_act", run_batch_norm_act, mutates_args=())


@_batch_norm_act.register_fake
def _(input, residual, weight, bias, mean, var, training, eps, activation, negative_slope):
    memory.refuse_under_compile("batch_norm_act")
    return torch.empty_like(dense(input), dtype=_result_dtype(input, residual))


def run_batch_norm_act_backward(grad_output: Tensor, input: Tensor, residual: Optional[Tensor],
                                    output: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                                    mean: Tensor, var: Tensor, training: bool, eps: float, activation: str,
                                    negative_slope: float, output_mask: list[bool]
                                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of batch_norm_act for (input, residual, weight, bias); those not asked for by ``output_mask``
    come back empty. The activation's derivative is taken on the pre-activation recomputed from the input, or
    from the input and ``residual``, or on the saved ``output`` (a residual was added, ReLU family); with neither
    and a residual added, the activation is the identity and the residual's gradient is grad_output itself (the
    caller's). ``mean``/``var`` are the statistics the forward used."""
    _require_kernels("batch_norm_act_backward", input)
    return batch_norm_act_backward_passes(grad_output, input, residual, output, weight, bias, mean, var, training,
                                          eps, activation, negative_slope, output_mask)


def batch_norm_act_backward_passes(grad_output: Tensor, input: Tensor, residual: Optional[Tensor],
                                   output: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                                   mean: Tensor, var: Tensor, training: bool, eps: float, activation: str,
                                   negative_slope: float, output_mask: list[bool],
                                   sums_to_means: Optional[Callable[[Tensor], Tensor]] = None
                                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """batch_norm_act_backward's reduce and dx passes. ``sums_to_means`` (a synchronized batch-norm's exchange)
    is called between them, on every rank that trains and wants the input's gradient, an empty one included,
    with this rank's ``[2, channels]`` sum(dz), sum(dz * xhat); it returns the whole group's per-channel means of
    them, which the dx pass then takes with count 1."""
    want_x, want_residual, want_weight, want_bias = output_mask
    x = dense(input)
    if x.numel() == 0:
        if sums_to_means is not None and training and want_x:
            sums_to_means(torch.zeros((2, x.shape[1]), dtype=statistics_dtype(x), device=x.device))
        grad_x, grad_z, grad_weight, grad_bias = _backward_outputs(x, output if output is not None else residual,
                                                                   weight, bias, output_mask)
        return grad_x, grad_z, grad_weight.zero_(), grad_bias.zero_()
    residual = _walkable_residual(x, residual)
    pre = output if output is not None else residual
    grad_x, grad_z, grad_weight, grad_bias = _backward_outputs(x, pre, weight, bias, output_mask)
    like = pre if pre is not None else x
    grad_y = grad_output if batch_norm_launchers.walkable(x, grad_output) else _laid_out_like(grad_output, like)
    sums = torch.empty((2, x.shape[1]), dtype=statistics_dtype(x), device=x.device)
    # dz is written by the reduction and read by the dx pass where the pre-activation needed more than x.
    keep_grad_z = pre is not None and (want_residual or (training and want_x))
    if keep_grad_z and grad_z.numel() == 0:
        grad_z = torch.empty_like(pre, dtype=torch.promote_types(x.dtype, pre.dtype))
    activation_args = dict(activation=activation, slope=negative_slope)
    with on_device(x):
        batch_norm_launchers.bn_act_backward_reduce(
            grad_y, x, mean, var, weight, bias, eps, sums_out=sums, output=output, residual=residual,
            grad_z_out=grad_z if keep_grad_z else None,
            grad_x_out=grad_x if (want_x and not training) else None,
            grad_weight_out=grad_weight if want_weight else None,
            grad_bias_out=grad_bias if want_bias else None, need_sums=training and want_x, **activation_args)
        if want_x and training:
            count = None  # x's values per channel
            if sums_to_means is not None:
                sums, count = sums_to_means(sums), 1
            batch_norm_launchers.bn_backward_dx(grad_z if pre is not None else grad_y, x, mean, var, weight,
                                                bias, eps, sums, grad_is_dy=pre is None, grad_x_out=grad_x,
                                                count=count, **activation_args)
    if not want_residual:
        grad_z = grad_z.new_empty(0)
    return grad_x, grad_z, grad_weight, grad_bias


def _walkable_residual(x: Tensor, residual: Optional[Tensor]) -> Optional[Tensor]:
    """The residual as the backward reads it, and writes dz with its strides: dense, in a layout the walk over x
    can read (copied otherwise)."""
    if residual is None:
        return None
    residual = dense(residual)
    return residual if batch_norm_launchers.walkable(x, residual) else _laid_out_like(residual, x)


def _backward_outputs(x, pre, weight, bias, output_mask):
    """The gradient tensors batch_norm_act_backward returns (empty where not asked for; parameter gradients
    contiguous, whatever the parameters' strides)."""
    want_x, want_residual, want_weight, want_bias = output_mask
    return (torch.empty_like(x) if want_x else x.new_empty(0),  # outputs may not alias: one empty each
            # dz in the output's dtype, as eager computes it before casting it to the residual's
            torch.empty_like(pre, dtype=torch.promote_types(x.dtype, pre.dtype))
            if (want_residual and pre is not None) else x.new_empty(0),
            x.new_empty(weight.shape, dtype=weight.dtype) if (want_weight and weight is not None) else x.new_empty(0),
            x.new_empty(bias.shape, dtype=bias.dtype) if (want_bias and bias is not None) else x.new_empty(0))


_batch_norm_act_backward = torch.library.custom_op("fusedres::batch_norm_act_backward",
                                                   run_batch_norm_act_backward, mutates_args=())


@_batch_norm_act_backward.register_fake
def _(grad_output, input, residual, output, weight, bias, mean, var, training, eps, activation, negative_slope,
      output_mask):
    x = dense(input)
    pre = output if output is not None else _walkable_residual(x, residual)
    return _backward_outputs(x, pre, weight, bias, output_mask)


def pre_activation_source(activation: str, has_residual: bool) -> str:
    """What the backward needs beyond the input to take the activation's derivative: "none" (no residual was
    added, or the identity), "output" (the ReLU family), or "residual"."""
    if not has_residual or activation == "identity":
        return "none"
    return "output" if activation in DERIVATIVE_FROM_OUTPUT else "residual"


def batch_norm_act_setup_context(ctx, inputs, output):
    input, residual, weight, bias, mean, var, training, eps, activation, negative_slope = inputs
    ctx.source = pre_activation_source(activation, residual is not None)
    pre = {"none": None, "output": output, "residual": residual}[ctx.source]
    ctx.save_for_backward(input, pre, weight, bias, mean, var)
    ctx.training, ctx.eps, ctx.activation, ctx.negative_slope = training, eps, activation, negative_slope
    ctx.residual_dtype = None if residual is None else residual.dtype


def batch_norm_act_gradients(ctx, grad_y: Tensor, backward: Callable) -> tuple:
    """The gradients of (input, residual, weight, bias), from what ``batch_norm_act_setup_context`` kept in
    ``ctx``, through ``backward`` (the registered backward op, or a synchronized batch-norm's passes)."""
    input, pre, weight, bias, mean, var = ctx.saved_tensors
    needs = ctx.needs_input_grad
    has_residual = ctx.residual_dtype is not None
    # With the identity, the residual's gradient is grad_y itself: no kernel writes it.
    output_mask = [needs[0], needs[1] and has_residual and ctx.source != "none", needs[2] and weight is not None,
                   needs[3] and bias is not None]
    grad_x, grad_residual, grad_weight, grad_bias = backward(
        grad_y, input, pre if ctx.source == "residual" else None, pre if ctx.source == "output" else None, weight,
        bias, mean, var, ctx.training, ctx.eps, ctx.activation, ctx.negative_slope, output_mask)
    if needs[1] and has_residual:
        grad_residual = (grad_residual if output_mask[1] else grad_y).to(ctx.residual_dtype)
    return (grad_x if output_mask[0] else None,
            grad_residual if needs[1] and has_residual else None,
            grad_weight if output_mask[2] else None,
            grad_bias if output_mask[3] else None)


def _batch_norm_act_autograd(ctx, grad_y):
    return batch_norm_act_gradients(ctx, grad_y, torch.ops.fusedres.batch_norm_act_backward) + (None,) * 6


_batch_norm_act.register_autograd(_batch_norm_act_autograd, setup_context=batch_norm_act_setup_context)


# ---------------------------------------------------------------------------------------------------------
# add_act
# ---------------------------------------------------------------------------------------------------------

def run_add_act(input: Tensor, residual: Tensor, activation: str, negative_slope: float) -> Tensor:
    """act(input + residual), in the promoted dtype and the layout eager gives."""
    _require_kernels("add_act", input)
    y = torch.empty_like(input, dtype=_result_dtype(input, residual))  # eager's layout for input + residual
    if y.numel() == 0:
        return y
    with on_device(y):
        add_act_launchers.add_act_forward(_laid_out_like(input, y), _laid_out_like(residual, y), y,
                                          activation=activation, slope=negative_slope)
    return y


_add_act = torch.library.custom_op("fusedres::add_act", run_add_act, mutates_args=())


@_add_act.register_fake
def _(input, residual, activation, negative_slope):
    return torch.empty_like(input, dtype=_result_dtype(input, residual))


def run_act_backward(grad_output: Tensor, first: Tensor, second: Optional[Tensor], activation: str,
                         negative_slope: float) -> Tensor:
    """grad_output * act'(z): z is ``first``, the output, when ``second`` is None (the ReLU family), else
    ``first + second``; in the layout and dtype of ``first`` (of their sum)."""
    _require_kernels("act_backward", first)
    like = first if second is None else torch.empty_like(first, dtype=_result_dtype(first, second))
    grad = torch.empty_like(like)
    if grad.numel() == 0:
        return grad
    with on_device(first):
        add_act_launchers.act_backward(_laid_out_like(grad_output, like), _laid_out_like(first, like),
                                       None if second is None else _laid_out_like(second, like), grad,
                                       activation=activation, slope=negative_slope)
    return grad


_act_backward = torch.library.custom_op("fusedres::act_backward", run_act_backward, mutates_args=())


@_act_backward.register_fake
def _(grad_output, first, second, activation, negative_slope):
    return torch.empty_like(first, dtype=first.dtype if second is None else _result_dtype(first, second))


def _add_act_setup_context(ctx, inputs, output):
    input, residual, activation, negative_slope = inputs
    ctx.source = pre_activation_source(activation, True)
    ctx.save_for_backward(*{"none": (), "output": (output,), "residual": (input, residual)}[ctx.source])
    ctx.activation, ctx.negative_slope = activation, negative_slope
    ctx.dtypes = (input.dtype, residual.dtype)


def _add_act_autograd(ctx, grad_y):
    saved = ctx.saved_tensors
    if ctx.source == "none":  # the identity: both summands get grad_y
        grad = grad_y
    else:
        grad = torch.ops.fusedres.act_backward(grad_y, saved[0], saved[1] if len(saved) > 1 else None,
                                               ctx.activation, ctx.negative_slope)
    # One gradient serves both summands (3e in all); a summand of another dtype gets its own cast.
    return tuple(grad.to(dtype) if needed else None
                 for dtype, needed in zip(ctx.dtypes, ctx.needs_input_grad[:2])) + (None, None)


_add_act.register_autograd(_add_act_autograd, setup_context=_add_act_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fusedres: double backward (differentiating a fusedres backward, e.g. with "
                       "create_graph=True) is not supported; run the model under fusedres.disabled() for that")


for _backward_op in (_batch_norm_act_backward, _act_backward):
    _backward_op.register_autograd(_no_double_backward)


# ---------------------------------------------------------------------------------------------------------
# The op layer's entry points (fusedres.functional's and the modules', after their validation): the backend
# choice, then the registered ops.
# ---------------------------------------------------------------------------------------------------------

def dispatch_batch_norm_act(input: Tensor, residual: Optional[Tensor], running_mean: Optional[Tensor],
                            running_var: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                            training: bool, momentum: float, eps: float, activation: str = "relu",
                            negative_slope: float = 0.01, num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """act(batch_norm(input) [+ residual]); updates the running statistics in place when training.

    ``num_batches_tracked`` (already incremented) selects the cumulative average (nn.BatchNorm2d's
    momentum=None); ``momentum`` is then ignored."""
    if not uses_kernels(input) or input.numel() == 0:  # an empty batch launches nothing: eager's own path
        if num_batches_tracked is not None:
            momentum = 1.0 / float(num_batches_tracked)
        y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return eager_activation(activation, y if residual is None else y + residual, negative_slope)
    if training:
        # The statistics are not differentiated through this op (batch_norm_act's backward does it).
        mean, var = torch.ops.fusedres.batch_norm_stats_(input.detach(), running_mean, running_var, momentum,
                                                         num_batches_tracked)
    else:
        mean, var = running_mean, running_var
    output = torch.ops.fusedres.batch_norm_act(input, residual, weight, bias, mean, var, training, eps, activation,
                                               float(negative_slope))
    if training and residual is None:
        memory.mark_recomputable(output)
    return output


def dispatch_add_act(input: Tensor, residual: Tensor, activation: str = "relu",
                     negative_slope: float = 0.01) -> Tensor:
    """act(input + residual)."""
    if not uses_kernels(input):
        return eager_activation(activation, input + residual, negative_slope)
    return torch.ops.fusedres.add_act(input, residual, activation, float(negative_slope))
