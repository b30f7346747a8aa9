"""Modules: ``BatchNormAct2d`` (an ``nn.BatchNorm2d`` that applies an activation, after an optional residual add;
timm's ``BatchNormAct2d`` signature and state_dict), ``BatchNormReLU2d`` (the same with ReLU) and ``AddReLU``, plus
the pieces conversion leaves in a model: ``ActivationFusedAway``, standing where an activation module was fused
into the batch-norm before it, and ``fused_site``, through which rewritten forwards call their fused batch-norms.
Both stay exact if a tool later swaps the fused batch-norm for another module (SyncBatchNorm, a frozen
batch-norm): they then run batch-norm, add and activation unfused, and warn once."""
from __future__ import annotations

import warnings
from typing import Any, Optional

from torch import Tensor, nn

from . import distributed
from . import functional as FF
from .ops import EAGER_ACTIVATIONS

__all__ = ["BatchNormAct2d", "BatchNormReLU2d", "SyncBatchNormAct2d", "AddReLU", "ActivationFusedAway",
           "fused_site", "fuse_activation_module", "describe_activation", "fused_class_for"]

# The patterns a fused site serves (conversion_report's keys): the ReLU ones, and every other activation
# (the identity included: a batch-norm followed by the residual add alone).
BATCH_NORM_RELU = "batch_norm_relu"
BATCH_NORM_ADD_RELU = "batch_norm_add_relu"
BATCH_NORM_ACT = "batch_norm_act"
BATCH_NORM_ADD_ACT = "batch_norm_add_act"


def site_pattern(activation: str, with_residual: bool) -> str:
    if activation == "relu":
        return BATCH_NORM_ADD_RELU if with_residual else BATCH_NORM_RELU
    return BATCH_NORM_ADD_ACT if with_residual else BATCH_NORM_ACT


# Names an activation goes by: fusedres's, and timm's (timm.layers.create_act).
_NAMES = {**{name: name for name in FF.ACTIVATIONS}, "swish": "silu", "hard_swish": "hardswish",
          "hardswish": "hardswish", "gelu_tanh": "gelu_tanh", "": "identity", "none": "identity"}
# Module classes by (module, name): torch's, and timm's own (their forwards compute the same expressions).
_TIMM = ("timm.layers.activations", "timm.layers.activations_me")
_CLASSES = {
    **{("torch.nn.modules.linear", "Identity"): "identity"},
    **{("torch.nn.modules.activation", name): activation for name, activation in (
        ("ReLU", "relu"), ("ReLU6", "relu6"), ("LeakyReLU", "leaky_relu"), ("SiLU", "silu"), ("GELU", "gelu"),
        ("Hardswish", "hardswish"), ("Mish", "mish"))},
    **{(module, name): activation for module in _TIMM for name, activation in (
        ("Swish", "silu"), ("SwishMe", "silu"), ("Mish", "mish"), ("MishMe", "mish"), ("HardSwish", "hardswish"),
        ("HardSwishMe", "hardswish"), ("GELU", "gelu"), ("GELUTanh", "gelu_tanh"))},
}


def describe_activation(act: Any) -> tuple[str, float] | None:
    """``(activation, negative_slope)`` for an activation given as a name (fusedres's or timm's), an ``nn.Module``
    class or instance (torch's or timm's), or None (the identity); None if fusedres does not fuse it."""
    if act is None:
        return "identity", 0.01
    if isinstance(act, str):
        name = _NAMES.get(act.lower())
        return None if name is None else (name, 0.01)
    kind = act if isinstance(act, type) else type(act)
    name = _CLASSES.get((kind.__module__, kind.__name__))
    if name is None:
        return None
    slope = float(getattr(act, "negative_slope", 0.01)) if not isinstance(act, type) else 0.01
    if name == "gelu" and getattr(act, "approximate", "none") == "tanh":
        name = "gelu_tanh"
    return name, slope


def _activation_module(act_layer, act_kwargs: dict | None, inplace: bool, apply_act: bool) -> nn.Module:
    """The activation module timm's BatchNormAct2d would hold (``act``), from a class, a name or a module."""
    if not apply_act or act_layer is None:
        return nn.Identity()
    if isinstance(act_layer, nn.Module):
        return act_layer
    if isinstance(act_layer, str):
        described = describe_activation(act_layer)
        if described is None:
            raise ValueError(f"BatchNormAct2d: unsupported activation {act_layer!r}; supported: "
                             f"{', '.join(FF.ACTIVATIONS)} (or their nn.Module classes, or timm's names)")
        return _ACTIVATION_MODULES[described[0]](**(act_kwargs or {}))
    kwargs = {"inplace": inplace, **(act_kwargs or {})}  # as timm passes it; meaningless once fused
    try:
        return act_layer(**kwargs)
    except TypeError:  # an activation without an inplace argument
        kwargs.pop("inplace")
        return act_layer(**kwargs)


_ACTIVATION_MODULES = {"identity": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "leaky_relu": nn.LeakyReLU,
                       "silu": nn.SiLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
                       "hardswish": nn.Hardswish, "mish": nn.Mish}


class BatchNormAct2d(nn.BatchNorm2d):
    """``act(batch_norm(input) [+ residual])`` through fusedres's fused kernels, ``act`` one of
    ``fusedres.functional.ACTIVATIONS``.

    timm's ``BatchNormAct2d`` signature and state_dict, and ``nn.BatchNorm2d``'s bookkeeping
    (``num_batches_tracked``, ``momentum=None`` as a cumulative average computed on the device,
    ``track_running_stats=False``, ``affine=False``, checkpoints without ``num_batches_tracked``). ``act_layer``:
    the activation's ``nn.Module`` class (torch's or timm's), an instance, or its name (fusedres's or timm's);
    ``apply_act=False``: the identity. A ``drop_layer`` sits between the batch-norm and the activation, where no
    kernel can fuse it: such a module runs the activation unfused, and says so when built."""

    #: which fused pattern this module serves; set by conversion
    fused_pattern = BATCH_NORM_ACT
    # Class-level defaults: conversion turns plain batch-norms into this class in place, without __init__.
    activation = "relu"
    negative_slope = 0.01

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, apply_act: bool = True, act_layer=nn.ReLU,
                 act_kwargs: dict | None = None, inplace: bool = True, drop_layer=None, device=None, dtype=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _activation_module(act_layer, act_kwargs, inplace, apply_act)
        described = describe_activation(self.act)
        if described is None:
            raise ValueError(f"BatchNormAct2d: unsupported activation {type(self.act).__name__}; supported: "
                             f"{', '.join(FF.ACTIVATIONS)} (or their nn.Module classes, or timm's names)")
        self.activation, self.negative_slope = described
        self.fused_pattern = site_pattern(self.activation, False)
        if drop_layer is not None:
            warnings.warn(f"BatchNormAct2d: a drop_layer ({type(self.drop).__name__}) between the batch-norm and "
                          f"the activation cannot be fused; this module runs the activation unfused", stacklevel=2)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(input)
        name = type(self).__name__
        drop = self._modules.get("drop")
        unfused_activation = drop is not None and not isinstance(drop, nn.Identity)
        if unfused_activation and residual is not None:
            raise ValueError(f"{name}: a module with a drop_layer takes no residual (the residual would have to be "
                             f"added after the drop layer, which this module does not do)")
        activation = "identity" if unfused_activation else self.activation
        momentum = 0.0 if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if keep_running else None
        running_var = self.running_var if keep_running else None
        synchronized = self._synchronized()
        # Checked before num_batches_tracked moves: a call that raises leaves the module as it was. (A synchronized
        # batch-norm's values per channel are the whole group's.)
        FF._check_batch_norm_act(name, input, residual, running_mean, running_var, self.weight, self.bias,
                                 use_batch_stats, momentum, self.eps, activation, self.negative_slope,
                                 values_per_channel_known=not synchronized)
        num_batches_tracked = None
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average: factor 1 / num_batches_tracked, on the device
                num_batches_tracked = self.num_batches_tracked
        if synchronized:
            out = distributed.sync_batch_norm_act(input, residual, running_mean, running_var, self.weight, self.bias,
                                                  momentum, self.eps, activation, self.negative_slope,
                                                  num_batches_tracked, self.__dict__.get("process_group"))
        else:
            out = FF._batch_norm_act(name, input, residual, running_mean, running_var, self.weight, self.bias,
                                     use_batch_stats, momentum, self.eps, activation, self.negative_slope,
                                     num_batches_tracked=num_batches_tracked)
        return self.act(drop(out)) if unfused_activation else out

    def _synchronized(self) -> bool:
        """Whether this call normalizes with a process group's statistics (SyncBatchNormAct2d)."""
        return False

    @classmethod
    def fuse(cls, batch_norm: nn.BatchNorm2d, activation: str = "relu", negative_slope: float = 0.01,
             with_residual: bool = False) -> "BatchNormAct2d":
        """Turn an ``nn.BatchNorm2d`` (or ``nn.SyncBatchNorm``, or timm's BatchNormAct2d) into this class in place:
        the same object, Parameters and buffers; ``revert`` gives back its original class."""
        original = batch_norm.__dict__.get("_fusedres_original_class", type(batch_norm))
        if not isinstance(batch_norm, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            raise TypeError(f"{cls.__name__}.fuse: expected an nn.BatchNorm2d or nn.SyncBatchNorm, got "
                            f"{type(batch_norm).__name__}")
        batch_norm.__class__ = cls
        batch_norm.__dict__.update(_fusedres_original_class=original, activation=activation,
                                   negative_slope=float(negative_slope),
                                   fused_pattern=site_pattern(activation, with_residual))
        return batch_norm

    @staticmethod
    def unfuse(module: "BatchNormAct2d") -> nn.BatchNorm2d:
        """Back to the class it had before ``fuse`` (the same object, Parameters and buffers)."""
        original = module.__dict__.pop("_fusedres_original_class", nn.BatchNorm2d)
        for attribute in ("activation", "negative_slope", "fused_pattern"):
            module.__dict__.pop(attribute, None)
        if not issubclass(original, (nn.SyncBatchNorm, SyncBatchNormAct2d)):  # (set by convert_sync_batchnorm)
            module.__dict__.pop("process_group", None)
        module.__class__ = original
        return module


class BatchNormReLU2d(BatchNormAct2d):
    """``relu(batch_norm(input) [+ residual])``: ``BatchNormAct2d`` with ReLU, with ``nn.BatchNorm2d``'s
    constructor, state_dict and repr (no ``act`` or ``drop`` submodules: it is what conversion makes of an
    ``nn.BatchNorm2d``)."""

    fused_pattern = BATCH_NORM_RELU

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None):
        nn.BatchNorm2d.__init__(self, num_features, eps=eps, momentum=momentum, affine=affine,
                                track_running_stats=track_running_stats, device=device, dtype=dtype)


class SyncBatchNormAct2d(BatchNormAct2d):
    """``act(batch_norm(input) [+ residual])`` with the statistics of the whole process group's batch when training
    under torch.distributed (``fusedres.distributed``): nn.SyncBatchNorm's constructor and state_dict, plus
    BatchNormAct2d's activation arguments. Deliberately not an nn.SyncBatchNorm: DistributedDataParallel refuses
    those in a CPU module, and this one also runs there (gloo). In evaluation, or in a single process (no process
    group, or one rank), it is a BatchNormAct2d: no communication. Every rank of ``process_group`` (default: the
    world) must call it when training, as with nn.SyncBatchNorm; per-rank batch sizes may differ, an empty one
    included."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None, act_layer=nn.ReLU,
                 act_kwargs: dict | None = None, apply_act: bool = True, inplace: bool = True, drop_layer=None,
                 device=None, dtype=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, apply_act=apply_act, act_layer=act_layer,
                         act_kwargs=act_kwargs, inplace=inplace, drop_layer=drop_layer, device=device, dtype=dtype)
        self.process_group = process_group

    def _synchronized(self) -> bool:
        if not self.training or distributed.world_size(self.__dict__.get("process_group")) == 1:
            return False
        drop = self._modules.get("drop")
        if drop is not None and not isinstance(drop, nn.Identity):
            raise ValueError(f"{type(self).__name__}: a drop_layer between the batch-norm and the activation cannot "
                             f"be synchronized and fused; use nn.SyncBatchNorm followed by the drop layer and the "
                             f"activation")
        return True


def fused_class_for(batch_norm: nn.Module, activation: str) -> type:
    """The class a batch-norm becomes when fused with ``activation``: synchronized if it was."""
    if isinstance(batch_norm, (nn.SyncBatchNorm, SyncBatchNormAct2d)):
        return SyncBatchNormAct2d
    return BatchNormReLU2d if activation == "relu" else BatchNormAct2d


class AddReLU(nn.Module):
    """``relu(input + residual)`` through fusedres's fused kernel."""

    def forward(self, input: Tensor, residual: Tensor) -> Tensor:
        return FF.add_relu(input, residual)


_warned: set = set()


def _warn_unfused(module: nn.Module) -> None:
    kind = type(module).__name__
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(f"fusedres: a fused batch-norm was replaced by a {kind} (e.g. by nn.SyncBatchNorm's "
                      f"convert_sync_batchnorm or a batch-norm freezer); its sites now run batch-norm, add and "
                      f"activation unfused: exact, but without the fused kernels. For synchronized batch-norm use "
                      f"fusedres.convert_sync_batchnorm, which keeps them fused; for other tools, call "
                      f"fusedres.revert before them and fusedres.convert after them.", stacklevel=3)


def fused_site(batch_norm: nn.Module, input: Tensor, residual: Optional[Tensor] = None, activation: str = "relu",
               negative_slope: float = 0.01) -> Tensor:
    """A fused site of a converted forward: act(batch_norm(input) [+ residual]), fused when ``batch_norm`` is
    still a BatchNormAct2d, else unfused (exact) with a warning."""
    if isinstance(batch_norm, BatchNormAct2d):
        return batch_norm(input, residual)
    _warn_unfused(batch_norm)
    out = batch_norm(input)
    return EAGER_ACTIVATIONS[activation](out if residual is None else out + residual, negative_slope)


class ActivationFusedAway(nn.Identity):
    """Stands where an activation module was whose work the batch-norm before it (``parent.<batch_norm_name>``,
    a BatchNormAct2d) now does. If that batch-norm is later replaced by a module that does not apply it, this
    applies it again (exact). ``fusedres.revert`` puts the activation module back."""

    def __init__(self, activation: nn.Module, parent: nn.Module, batch_norm_name: str):
        super().__init__()
        # Plain attributes, not submodules: no state_dict entries, no second path to the parent.
        self.__dict__["activation_module"] = activation
        self.__dict__["parent"] = parent
        self.__dict__["batch_norm_name"] = batch_norm_name
        self.training = activation.training

    def forward(self, input: Tensor) -> Tensor:
        batch_norm = self.__dict__["parent"]._modules.get(self.__dict__["batch_norm_name"])
        if isinstance(batch_norm, BatchNormAct2d):
            return input
        _warn_unfused(batch_norm)
        return self.__dict__["activation_module"](input)

    def extra_repr(self) -> str:
        return f"{type(self.__dict__['activation_module']).__name__} fused into {self.__dict__['batch_norm_name']}"


def fuse_activation_module(parent: nn.Module, batch_norm_name: str, activation_name: str) -> None:
    """``parent.<batch_norm_name>`` (an nn.BatchNorm2d) takes over the work of ``parent.<activation_name>`` (a
    module that ``describe_activation`` knows): the batch-norm becomes a BatchNormAct2d (a BatchNormReLU2d for
    ReLU) in place, the activation module an ActivationFusedAway. Idempotent."""
    activation_module = parent._modules[activation_name]
    if isinstance(activation_module, ActivationFusedAway):
        return
    activation, negative_slope = describe_activation(activation_module)
    batch_norm = parent._modules[batch_norm_name]
    fused_class_for(batch_norm, activation).fuse(batch_norm, activation, negative_slope)
    parent._modules[activation_name] = ActivationFusedAway(activation_module, parent, batch_norm_name)
