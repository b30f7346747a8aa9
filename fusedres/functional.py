"""The public functions. Each validates its input, then hands it to the op layer (``fusedres/ops.py``).

Semantics are eager PyTorch's: ``F.batch_norm`` (batch statistics and an in-place running-statistics update
when ``training``, running statistics otherwise), then the residual add, then the activation (``ACTIVATIONS``,
each the eager expression of ``fusedres/activations.py``'s table).

``validate_batch_norm_act`` is every check of a batch-norm call, for the modules, which validate before they touch
their own bookkeeping and then call the op layer themselves (one validation per call).
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from . import ops
from .activations import ACTIVATIONS

__all__ = ["batch_norm_act", "batch_norm_relu", "batch_norm_add_relu", "add_act", "add_relu", "ACTIVATIONS",
           "validate_batch_norm_act"]

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF = (torch.float16, torch.bfloat16)


def _check_tensor(fn: str, name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: expected {name} to be a torch.Tensor, got {type(t).__name__}")


def _check_floating(fn: str, name: str, t: Tensor) -> None:
    if t.dtype not in _FLOATING:
        raise TypeError(f"{fn}: expected {name} of dtype float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_same_device(fn: str, name: str, t: Tensor, input: Tensor) -> None:
    if t.device != input.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but input is on {input.device}")


def _check_residual(fn: str, input: Tensor, residual) -> None:
    _check_tensor(fn, "residual", residual)
    _check_floating(fn, "residual", residual)
    if residual.shape != input.shape:
        raise ValueError(f"{fn}: residual shape {tuple(residual.shape)} != input shape {tuple(input.shape)} "
                         f"(no broadcasting)")
    _check_same_device(fn, "residual", residual, input)


def _check_number(fn: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: expected {name} to be a float, got {type(value).__name__}")


def _elements(t: Tensor) -> set:
    """The storage elements a 1-D tensor refers to."""
    return set(range(t.storage_offset(), t.storage_offset() + (t.numel() - 1) * t.stride(0) + 1, t.stride(0) or 1))


def _check_running_statistics(fn: str, running_mean, running_var, training: bool) -> None:
    """Running statistics are buffers: never differentiable; when training they are written in place, so each
    of their elements must be one memory location of its own (any stride is fine, an expanded one is not)."""
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t.requires_grad:
            raise ValueError(f"{fn}: {name} requires grad; running statistics are not differentiable (eager "
                             f"PyTorch refuses them too): pass a buffer, or {name}.detach()")
        if training and t.numel() > 1 and t.stride(0) == 0:
            raise ValueError(f"{fn}: {name} is updated in place when training, but its elements share one memory "
                             f"location (stride 0, e.g. expanded from one value); pass a tensor with one element "
                             f"per channel")
    if (training and not torch.compiler.is_compiling() and running_mean.device.type != "meta"
            and running_mean.untyped_storage().data_ptr() == running_var.untyped_storage().data_ptr()
            and _elements(running_mean) & _elements(running_var)):
        raise ValueError(f"{fn}: running_mean and running_var share memory; both are updated in place when "
                         f"training, so they must not overlap")


def _check_eps(fn: str, eps, training: bool) -> None:
    # As eager's batch_norm: the batch variance may be 0, so training needs eps > 0.
    if training and not eps > 0:
        raise ValueError(f"{fn}: eps must be positive when training (batch statistics), got {eps}")
    if not eps >= 0:
        raise ValueError(f"{fn}: eps must be non-negative, got {eps}")


def _check_batch_norm_args(fn: str, input, running_mean, running_var, weight, bias, training, momentum,
                           eps, values_per_channel_known: bool = True) -> None:
    _check_tensor(fn, "input", input)
    if input.dim() < 2:
        raise ValueError(f"{fn}: expected an input of 2 or more dimensions ((N, C), (N, C, L), (N, C, H, W), "
                         f"(N, C, D, H, W)...), got a {input.dim()}-D tensor of shape {tuple(input.shape)}")
    _check_floating(fn, "input", input)
    if not isinstance(training, bool):
        raise TypeError(f"{fn}: expected training to be a bool, got {type(training).__name__}")
    _check_number(fn, "momentum", momentum)
    _check_number(fn, "eps", eps)
    channels = input.shape[1]
    allowed = (input.dtype, torch.float32) if input.dtype in _HALF else (input.dtype,)
    given = {}
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is None:
            continue
        _check_tensor(fn, name, t)
        if t.shape != (channels,):
            raise ValueError(f"{fn}: expected {name} of shape ({channels},) for an input with {channels} "
                             f"channels, got shape {tuple(t.shape)}")
        if t.dtype not in allowed:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype}; with a {input.dtype} input the parameters and "
                            f"buffers must be {' or '.join(str(d) for d in allowed)}")
        _check_same_device(fn, name, t, input)
        given[name] = t
    if len({t.dtype for t in given.values()}) > 1:
        raise TypeError(f"{fn}: parameters and buffers must share one dtype, got "
                        + ", ".join(f"{name} {t.dtype}" for name, t in given.items()))
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{fn}: running_mean and running_var must be given together or both be None")
    if not training and running_mean is None and input.numel() > 0:  # eager lets an empty batch through
        raise ValueError(f"{fn}: running_mean and running_var must be given in evaluation mode "
                         f"(training=False)")
    if running_mean is not None:
        _check_running_statistics(fn, running_mean, running_var, training)
    _check_eps(fn, eps, training)
    if training and values_per_channel_known:  # (a synchronized batch-norm's are the whole group's)
        values_per_channel = input.numel() // channels if channels else 0
        if values_per_channel == 1:
            raise ValueError(f"{fn}: Expected more than 1 value per channel when training, got input size "
                             f"{input.shape}")


def batch_norm_act(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
                   momentum: float = 0.1, eps: float = 1e-5, *, residual: Optional[Tensor] = None,
                   activation: str = "relu", negative_slope: float = 0.01) -> Tensor:
    """``act(F.batch_norm(input, ...) [+ residual])``, ``act`` one of ``ACTIVATIONS`` ("identity": the
    batch-norm, and the add, alone); ``negative_slope`` is leaky_relu's."""
    if residual is not None:
        _check_tensor("batch_norm_act", "residual", residual)
    return _batch_norm_act("batch_norm_act", input, residual, running_mean, running_var, weight, bias, training,
                           momentum, eps, activation, negative_slope)


def batch_norm_relu(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
                    momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """``relu(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps))``."""
    return _batch_norm_act("batch_norm_relu", input, None, running_mean, running_var, weight, bias, training,
                           momentum, eps)


def batch_norm_add_relu(input: Tensor, residual: Tensor, running_mean: Optional[Tensor],
                        running_var: Optional[Tensor], weight: Optional[Tensor] = None,
                        bias: Optional[Tensor] = None, training: bool = False, momentum: float = 0.1,
                        eps: float = 1e-5) -> Tensor:
    """``relu(F.batch_norm(input, ...) + residual)``; ``residual`` has input's shape, any float dtype, and the
    result eager's promoted dtype."""
    _check_tensor("batch_norm_add_relu", "residual", residual)
    return _batch_norm_act("batch_norm_add_relu", input, residual, running_mean, running_var, weight, bias,
                           training, momentum, eps)


def add_act(input: Tensor, residual: Tensor, *, activation: str = "relu", negative_slope: float = 0.01) -> Tensor:
    """``act(input + residual)`` for two float tensors of the same shape (any rank, no broadcasting)."""
    _check_add_act("add_act", input, residual, activation, negative_slope)
    return ops.dispatch_add_act(input, residual, activation, negative_slope)


def add_relu(input: Tensor, residual: Tensor) -> Tensor:
    """``relu(input + residual)`` for two float tensors of the same shape (any rank, no broadcasting)."""
    _check_add_act("add_relu", input, residual, "relu", 0.01)
    return ops.dispatch_add_act(input, residual)


def _check_activation(fn: str, activation, negative_slope) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{fn}: unsupported activation {activation!r}; supported: {', '.join(ACTIVATIONS)}")
    _check_number(fn, "negative_slope", negative_slope)


def _check_add_act(fn: str, input, residual, activation, negative_slope) -> None:
    _check_tensor(fn, "input", input)
    _check_floating(fn, "input", input)
    _check_residual(fn, input, residual)
    _check_activation(fn, activation, negative_slope)


def validate_batch_norm_act(fn: str, input, residual, running_mean, running_var, weight, bias, training, momentum,
                            eps, activation: str = "relu", negative_slope: float = 0.01,
                            values_per_channel_known: bool = True) -> None:
    """Every check of a batch-norm (+ add) + activation call; errors name ``fn``. Modules call it before they
    touch their own bookkeeping, so that a call that raises leaves them as they were."""
    _check_batch_norm_args(fn, input, running_mean, running_var, weight, bias, training, momentum, eps,
                           values_per_channel_known)
    if residual is not None:
        _check_residual(fn, input, residual)
    _check_activation(fn, activation, negative_slope)


def _batch_norm_act(fn: str, input, residual, running_mean, running_var, weight, bias, training, momentum, eps,
                    activation: str = "relu", negative_slope: float = 0.01,
                    num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """Validate (errors name ``fn``), then act(batch_norm(input) [+ residual]). ``num_batches_tracked``
    (already incremented) selects nn.BatchNorm2d's cumulative average (momentum=None), computed on the device."""
    validate_batch_norm_act(fn, input, residual, running_mean, running_var, weight, bias, training, momentum, eps,
                            activation, negative_slope)
    return ops.dispatch_batch_norm_act(input, residual, running_mean, running_var, weight, bias, training, momentum,
                                       eps, activation, negative_slope, num_batches_tracked)
