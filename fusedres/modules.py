"""Modules: ``BatchNormReLU2d`` (an ``nn.BatchNorm2d`` that applies ReLU, after an optional residual add) and
``AddReLU``, plus the pieces conversion leaves in a model: ``ReLUFusedAway``, standing where a ReLU module was
fused into the batch-norm before it, and ``fused_site``, through which rewritten forwards call their fused
batch-norms. Both stay exact if a tool later swaps the fused batch-norm for another module (SyncBatchNorm,
a frozen batch-norm): they then run batch-norm, add and ReLU unfused, and warn once."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from . import functional as FF

__all__ = ["BatchNormReLU2d", "AddReLU", "ReLUFusedAway", "fused_site", "fuse_relu_module"]

BATCH_NORM_RELU = "batch_norm_relu"
BATCH_NORM_ADD_RELU = "batch_norm_add_relu"


class BatchNormReLU2d(nn.BatchNorm2d):
    """``relu(batch_norm(input) [+ residual])`` through fusedres's fused kernels.

    Same constructor, state_dict and bookkeeping as ``nn.BatchNorm2d`` (``num_batches_tracked``, ``momentum=None``
    as a cumulative average computed on the device, ``track_running_stats=False``, ``affine=False``, checkpoints
    without ``num_batches_tracked``); only the arithmetic differs: the ReLU, and the residual add, are fused in.
    """

    #: which fused pattern this module serves ("batch_norm_relu" or "batch_norm_add_relu"); set by conversion
    fused_pattern = BATCH_NORM_RELU

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if keep_running else None
        running_var = self.running_var if keep_running else None
        name = type(self).__name__
        # Checked before num_batches_tracked moves: a call that raises leaves the module as it was.
        FF._check_batch_norm_act(name, input, residual, running_mean, running_var, self.weight, self.bias,
                                 use_batch_stats, momentum, self.eps)
        num_batches_tracked = None
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average: factor 1 / num_batches_tracked, on the device
                num_batches_tracked = self.num_batches_tracked
        return FF._batch_norm_act(name, input, residual, running_mean, running_var, self.weight, self.bias,
                                  use_batch_stats, momentum, self.eps, num_batches_tracked=num_batches_tracked)

    @classmethod
    def fuse(cls, batch_norm: nn.BatchNorm2d, pattern: str = BATCH_NORM_RELU) -> "BatchNormReLU2d":
        """Turn an ``nn.BatchNorm2d`` into a BatchNormReLU2d in place: the same object, Parameters and buffers."""
        if type(batch_norm) is not nn.BatchNorm2d and type(batch_norm) is not cls:
            raise TypeError(f"BatchNormReLU2d.fuse: expected an nn.BatchNorm2d, got {type(batch_norm).__name__}")
        batch_norm.__class__ = cls
        batch_norm.fused_pattern = pattern
        return batch_norm

    @staticmethod
    def unfuse(module: "BatchNormReLU2d") -> nn.BatchNorm2d:
        """Back to a plain ``nn.BatchNorm2d`` in place (the same object, Parameters and buffers)."""
        module.__dict__.pop("fused_pattern", None)
        module.__class__ = nn.BatchNorm2d
        return module


class AddReLU(nn.Module):
    """``relu(input + residual)`` through fusedres's fused kernel."""

    def forward(self, input: Tensor, residual: Tensor) -> Tensor:
        return FF.add_relu(input, residual)


_warned: set = set()


def _warn_unfused(module: nn.Module) -> None:
    kind = type(module).__name__
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(f"fusedres: a fused batch-norm was replaced by a {kind} (e.g. by convert_sync_batchnorm or "
                      f"a batch-norm freezer); its sites now run batch-norm, add and ReLU unfused: exact, but "
                      f"without the fused kernels. Call fusedres.revert before such tools and convert after them.",
                      stacklevel=3)


def fused_site(batch_norm: nn.Module, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
    """A fused site of a converted forward: relu(batch_norm(input) [+ residual]), fused when ``batch_norm`` is
    still a BatchNormReLU2d, else unfused (exact) with a warning."""
    if isinstance(batch_norm, BatchNormReLU2d):
        return batch_norm(input, residual)
    _warn_unfused(batch_norm)
    out = batch_norm(input)
    return torch.relu(out if residual is None else out + residual)


class ReLUFusedAway(nn.Identity):
    """Stands where a ReLU module was whose work the batch-norm before it (``parent.<batch_norm_name>``, a
    BatchNormReLU2d) now does. If that batch-norm is later replaced by a module that does not apply ReLU, this
    applies it again (exact). ``fusedres.revert`` puts the ReLU module back."""

    def __init__(self, relu: nn.Module, parent: nn.Module, batch_norm_name: str):
        super().__init__()
        # Plain attributes, not submodules: no state_dict entries, no second path to the parent.
        self.__dict__["relu"] = relu
        self.__dict__["parent"] = parent
        self.__dict__["batch_norm_name"] = batch_norm_name
        self.training = relu.training

    def forward(self, input: Tensor) -> Tensor:
        batch_norm = self.__dict__["parent"]._modules.get(self.__dict__["batch_norm_name"])
        if isinstance(batch_norm, BatchNormReLU2d):
            return input
        _warn_unfused(batch_norm)
        return self.__dict__["relu"](input)

    def extra_repr(self) -> str:
        return f"fused into {self.__dict__['batch_norm_name']}"


def fuse_relu_module(parent: nn.Module, batch_norm_name: str, relu_name: str) -> None:
    """``parent.<batch_norm_name>`` (an nn.BatchNorm2d) takes over the work of ``parent.<relu_name>``: the
    batch-norm becomes a BatchNormReLU2d in place, the ReLU module is replaced by a ReLUFusedAway. Idempotent."""
    if isinstance(parent._modules[relu_name], ReLUFusedAway):
        return
    BatchNormReLU2d.fuse(parent._modules[batch_norm_name], BATCH_NORM_RELU)
    parent._modules[relu_name] = ReLUFusedAway(parent._modules[relu_name], parent, batch_norm_name)
