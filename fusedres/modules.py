"""The public modules: ``BatchNormAct1d`` / ``2d`` / ``3d`` (an ``nn.BatchNorm1d`` / ``2d`` / ``3d`` that applies an
activation, after an optional residual add; timm's ``BatchNormAct2d`` signature and state_dict),
``BatchNormReLU1d`` / ``2d`` / ``3d`` (the same with ReLU and nn's constructor), ``SyncBatchNormAct2d``,
``FrozenBatchNormAct2d`` (frozen statistics and affine: torchvision's ``FrozenBatchNorm2d`` state_dict, timm's
``FrozenBatchNormAct2d`` signature), all of them ``BatchNormAct``s, and ``AddReLU``; and the call-time checks they
share with what conversion leaves in a model (``fusedres/converted.py``): whether hooks watch a module
(``hooks_active``), whether a torch.fx trace is running (``tracing``, ``fx_leaf``).

A module's activation is read at every call: from its ``act`` (timm's semantics), from the activation module
conversion fused into it, or from what conversion recorded. A converted batch-norm is called by its site
(``converted.fused_site``) with the site's activation, or alone (``activation="identity"``). Under torch.fx
symbolic tracing a fused module records itself as one call, doing what the original module did (a plain
batch-norm: no activation)."""
from __future__ import annotations

import importlib
import inspect
import warnings
from typing import Any, Optional

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import distributed, ops
from . import functional as FF
from .activations import ACTIVATIONS, activation_class, describe_activation

__all__ = ["BatchNormAct", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "BatchNormReLU1d", "BatchNormReLU2d",
           "BatchNormReLU3d", "SyncBatchNormAct2d", "FrozenBatchNormAct2d", "AddReLU", "fused_class_for",
           "site_pattern"]

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


def _activation_module(act_layer, act_kwargs: dict | None, inplace: bool, apply_act: bool) -> nn.Module:
    """The activation module timm's BatchNormAct2d would hold (``act``), built as timm builds it: a name through
    timm's own table when timm is installed (else the torch module of that name: ``activation_class``), a class
    with ``inplace`` and ``act_kwargs`` (without ``inplace`` if it takes none), an instance as it is."""
    if not apply_act or act_layer is None:
        return nn.Identity()
    if isinstance(act_layer, nn.Module):
        return act_layer
    if isinstance(act_layer, str):
        if describe_activation(act_layer) is None:
            raise ValueError(f"fusedres: unsupported activation {act_layer!r}; supported: "
                             f"{', '.join(ACTIVATIONS)} (or their nn.Module classes, or timm's names)")
        act_layer = activation_class(act_layer)
    kwargs = {"inplace": inplace, **(act_kwargs or {})}  # as timm passes it; meaningless once fused
    try:
        return act_layer(**kwargs)
    except TypeError:  # an activation without an inplace argument
        kwargs.pop("inplace")
        return act_layer(**kwargs)


def hooks_active(*modules: nn.Module | None) -> bool:
    """Whether a call of these modules would run hooks (their own, or global ones): a fused site that skips the
    call of one of them, or shows it another output, must then run unfused."""
    from torch.nn.modules import module as torch_module

    if (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
            or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks):
        return True
    return any(own_hooks(m) for m in modules)


def own_hooks(module: nn.Module | None) -> bool:
    """Whether ``module`` has hooks of its own (fusedres's own, ``fusedres.memory``'s switch, do not count)."""
    if module is None:
        return False
    return any(not getattr(hook, "_fusedres_internal", False)
               for hooks in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
                             module._backward_pre_hooks) for hook in hooks.values())


def tracing(*args) -> bool:
    """Whether these arguments are torch.fx Proxies (a symbolic trace is running)."""
    return any(isinstance(a, fx.Proxy) for a in args)


def fx_leaf(module: nn.Module, args: tuple, kwargs: dict):
    """Under torch.fx symbolic tracing, ``module``'s call as one ``call_module`` node (a Proxy), else None: the
    fused modules' Python (validation, layouts, backend choice) cannot run on Proxies, and the node calls the
    module itself when the traced graph runs."""
    proxy = next((a for a in args if isinstance(a, fx.Proxy)), None)
    if proxy is None:
        return None
    tracer = proxy.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, kwargs)


def refuse_scripting(module: nn.Module):
    """``__prepare_scriptable__`` of fusedres's modules: torch.jit.script would fail on them with an unrelated
    message (they launch Triton kernels from Python)."""
    raise TypeError(f"torch.jit.script: {type(module).__name__} is one of fusedres's fused modules, which launch "
                    f"Triton kernels from Python and cannot be scripted; script fusedres.revert(model) instead (the "
                    f"same state_dict and results, unfused), or use torch.compile or torch.export, which trace the "
                    f"fused model")


_warned_once: set = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned_once:
        _warned_once.add(key)
        warnings.warn(message, stacklevel=3)


def _bias_argument(cls: type, bias: bool) -> dict:
    """``bias=False`` for nn's batch-norm constructor (a weight without a bias), where this torch has it."""
    if bias:
        return {}
    if "bias" not in inspect.signature(_BatchNorm.__init__).parameters:
        raise TypeError(f"{cls.__name__}: bias=False needs a torch whose nn.BatchNorm2d takes it (2.14 does); this "
                        f"is torch {torch.__version__}")
    return {"bias": False}


class BatchNormAct(nn.Module):
    """``act(batch_norm(input) [+ residual])`` through fusedres's fused kernels, ``act`` one of
    ``fusedres.functional.ACTIVATIONS``: the base of every fused batch-norm module (``BatchNormAct1d`` / ``2d`` /
    ``3d``, ``BatchNormReLU*d``, ``SyncBatchNormAct2d``, ``FrozenBatchNormAct2d``); ``isinstance(m, BatchNormAct)``
    finds them all.

    Each is also an instance of the batch-norm class it stands for (nn.BatchNorm1d / 2d / 3d; a frozen one converted
    from torchvision's or timm's, of that class), with its bookkeeping (``num_batches_tracked``, ``momentum=None`` as
    a cumulative average computed on the device, ``track_running_stats=False``, ``affine=False``, ``bias=False``,
    checkpoints without ``num_batches_tracked``). ``act_layer``: the activation's ``nn.Module`` class (torch's or
    timm's), an instance, or its name (fusedres's or timm's, built as timm builds it); ``apply_act=False``: the
    identity. The activation is read from ``act`` at every call, so a module swapped in or an attribute changed
    later is applied; one fusedres does not fuse (``nn.ELU``, say) runs after the fused batch-norm, unfused, with a
    warning. A ``drop_layer`` sits between the batch-norm and the activation, where no kernel can fuse it: such a
    module runs the activation unfused, and says so when built."""

    #: which fused pattern this module serves; set by conversion
    fused_pattern = BATCH_NORM_ACT
    __prepare_scriptable__ = refuse_scripting
    # Class-level default of what the module applies without an ``act`` module or a fused-away partner; conversion
    # turns plain batch-norms into this class in place, without __init__, and records the site's in __dict__.
    _fusedres_activation = ("relu", 0.01)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, apply_act: bool = True, act_layer=nn.ReLU,
                 act_kwargs: dict | None = None, inplace: bool = True, drop_layer=None, device=None, dtype=None, *,
                 bias: bool = True):
        # (the batch-norm class after this one in the MRO: nn.BatchNorm1d / 2d / 3d)
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype,
                         **_bias_argument(type(self), bias))
        self._add_activation(act_layer, act_kwargs, inplace, apply_act, drop_layer)

    def _add_activation(self, act_layer, act_kwargs: dict | None, inplace: bool, apply_act: bool,
                        drop_layer) -> None:
        """The ``drop`` and ``act`` submodules, as timm's BatchNormAct2d builds them."""
        name = type(self).__name__
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _activation_module(act_layer, act_kwargs, inplace, apply_act)
        described = describe_activation(self.act)
        if described is None:
            raise ValueError(f"{name}: unsupported activation {type(self.act).__name__}; supported: "
                             f"{', '.join(ACTIVATIONS)} (or their nn.Module classes, or timm's names)")
        if drop_layer is not None:
            warnings.warn(f"{name}: a drop_layer ({type(self.drop).__name__}) between the batch-norm and the "
                          f"activation cannot be fused; this module runs the activation unfused", stacklevel=3)

    @property
    def activation(self) -> str | None:
        """The activation this module applies when called on its own, now (None: its ``act`` is not one fusedres
        fuses, and runs unfused after it)."""
        own = self.own_activation()
        return None if own is None else own[0]

    @property
    def negative_slope(self) -> float:
        own = self.own_activation()
        return 0.01 if own is None else own[1]

    def own_activation(self) -> tuple[str, float] | None:
        """``(activation, negative_slope)`` this module applies when called on its own, read now: from its ``act``
        module (None if fusedres does not fuse it); for a batch-norm that conversion fused with the activation
        module after it, from that module (the identity when that module must run itself: replaced, hooked, or
        not fusable any more); else what conversion recorded (BatchNormReLU2d: ReLU)."""
        act = self._modules.get("act")
        if act is not None:
            return describe_activation(act)
        partner = self.__dict__.get("_fusedres_partner")
        if partner is not None:
            return describe_activation(partner.activation_module) if self.fuses_partner() else ("identity", 0.01)
        return self._fusedres_activation

    def was_plain_batch_norm(self) -> bool:
        """Whether conversion made this module from a plain batch-norm (no activation of its own in the
        original: the activation it fuses belonged to the module or function after it)."""
        original = self.__dict__.get("_fusedres_original_class")
        return original is not None and not _has_own_activation(original)

    def applies_only_own_activation(self) -> bool:
        """For a site that conversion gave this module (a timm BatchNormAct2d taking the add after it): whether its
        own act is still the identity, not hooked and without a drop layer, so that the site may fuse the add and
        the site's activation into it."""
        act, drop = self._modules.get("act"), self._modules.get("drop")
        if act is None:
            return True
        return (describe_activation(act) == ("identity", 0.01) and (drop is None or isinstance(drop, nn.Identity))
                and not hooks_active(act, drop))

    def fuses_partner(self) -> bool:
        """Whether this call applies the activation of the module conversion fused away after it (an
        ActivationFusedAway, which then passes its input through): it must still stand where the activation was,
        nothing may be hooked on the two, and its activation must still be one fusedres fuses."""
        partner = self.__dict__.get("_fusedres_partner")
        if partner is None:
            return False
        activation_module = partner.activation_module
        return (partner.stands_in_place() and not hooks_active(self, partner, activation_module)
                and describe_activation(activation_module) is not None)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None, *, activation: str | None = None,
                negative_slope: float = 0.01) -> Tensor:
        """act(batch_norm(input) [+ residual]); ``activation`` (with ``negative_slope``): the site's, which
        converted forwards pass (``fused_site``), else the module's own (``own_activation``)."""
        if self.__dict__.get("_fusedres_alone"):  # the batch-norm alone (running_alone)
            activation, negative_slope = "identity", 0.01
        if tracing(input, residual):  # one node, doing what the original module did (a plain one: no activation)
            if activation is None and self.was_plain_batch_norm():
                activation, negative_slope = "identity", 0.01
            return fx_leaf(self, (input, residual), {} if activation is None else
                            dict(activation=activation, negative_slope=negative_slope))
        self._check_input_dim(input)
        input = self._promoted(input)
        name = type(self).__name__
        drop = self._modules.get("drop")
        unfused_activation = False
        if activation is None:
            own = self.own_activation()
            # its act (and drop) run as modules when they are not fusable, or hooked
            unfused_activation = (own is None or (drop is not None and not isinstance(drop, nn.Identity))
                                  or ("act" in self._modules and hooks_active(self.act, drop)))
            if own is None:
                warn_once(f"act:{type(self.act).__name__}",
                           f"{name}: its activation {type(self.act).__name__} is not one fusedres fuses; it runs "
                           f"unfused after the fused batch-norm (exact)")
            elif residual is not None and unfused_activation and not isinstance(drop, nn.Identity):
                raise ValueError(f"{name}: a module with a drop_layer takes no residual (the residual would have "
                                 f"to be added after the drop layer, which this module does not do)")
            activation, negative_slope = ("identity", 0.01) if unfused_activation else own
        use_batch_stats, running_mean, running_var, momentum = self._statistics()
        synchronized = self._synchronized()
        # Checked before num_batches_tracked moves: a call that raises leaves the module as it was. (A synchronized
        # batch-norm's values per channel are the whole group's.)
        FF.validate_batch_norm_act(name, input, residual, running_mean, running_var, self.weight, self.bias,
                                   use_batch_stats, momentum, self.eps, activation, negative_slope,
                                   values_per_channel_known=not synchronized)
        num_batches_tracked = self._count_batch()
        if synchronized:
            out = distributed.sync_batch_norm_act(input, residual, running_mean, running_var, self.weight, self.bias,
                                                  momentum, self.eps, activation, negative_slope,
                                                  num_batches_tracked, self.__dict__.get("process_group"))
        else:
            out = ops.dispatch_batch_norm_act(input, residual, running_mean, running_var, self.weight, self.bias,
                                              use_batch_stats, momentum, self.eps, activation, negative_slope,
                                              num_batches_tracked)
        if unfused_activation:
            return self.act(drop(out) if drop is not None else out)
        return out

    def _promoted(self, input: Tensor) -> Tensor:
        """The input in the dtype this module computes in: its own (nn.BatchNorm's output has the input's dtype,
        whatever its parameters')."""
        return input

    def _statistics(self) -> tuple[bool, Tensor | None, Tensor | None, float]:
        """``(use_batch_stats, running_mean, running_var, momentum)`` for this call, as nn.BatchNorm decides them:
        batch statistics when training or without running statistics; running statistics updated when training
        only if tracked."""
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        return (use_batch_stats, self.running_mean if keep_running else None,
                self.running_var if keep_running else None, 0.0 if self.momentum is None else self.momentum)

    def _count_batch(self) -> Tensor | None:
        """Count this batch in ``num_batches_tracked`` when nn.BatchNorm would; return the counter when it sets the
        running-statistics factor (momentum=None: a cumulative average, 1 / num_batches_tracked on the device)."""
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                return self.num_batches_tracked
        return None

    def _synchronized(self) -> bool:
        """Whether this call normalizes with a process group's statistics (SyncBatchNormAct2d)."""
        return False

    @classmethod
    def fuse(cls, batch_norm: nn.Module, activation: str = "relu", negative_slope: float = 0.01,
             with_residual: bool = False, original: type | None = None) -> "BatchNormAct":
        """Turn a batch-norm (nn.BatchNorm1d / 2d / 3d, nn.SyncBatchNorm, torchvision's FrozenBatchNorm2d, timm's
        BatchNormAct2d or FrozenBatchNormAct2d) into this class in place: the same object, Parameters and buffers;
        ``revert`` gives back its original class (``original``: the class revert should give instead, e.g.
        nn.SyncBatchNorm for a batch-norm that convert_sync_batchnorm synchronizes). A class outside torch.nn
        (torchvision's, timm's) is kept as a base: the module becomes a subclass of this class and of it, so that
        the tools looking for it (timm's ``freeze_batch_norm_2d``, ``convert_sync_batchnorm``, code that finds frozen
        batch-norms by type) still do."""
        original = original or batch_norm.__dict__.get("_fusedres_original_class", type(batch_norm))
        if not (isinstance(batch_norm, (_BatchNorm, BatchNormAct)) or kept_original_base(original) is not None):
            raise TypeError(f"{cls.__name__}.fuse: expected a batch-norm (nn.BatchNorm1d, 2d or 3d, nn.SyncBatchNorm, "
                            f"torchvision's FrozenBatchNorm2d, timm's BatchNormAct2d or FrozenBatchNormAct2d), got "
                            f"{type(batch_norm).__name__}")
        if is_frozen_class(original) != issubclass(cls, FrozenBatchNormAct2d):
            raise TypeError(f"{cls.__name__}.fuse: a {original.__name__} becomes "
                            f"{'a FrozenBatchNormAct2d' if is_frozen_class(original) else 'a trainable BatchNormAct'}"
                            f"; fused_class_for(module, activation) names the class")
        kept = kept_original_base(original)
        if kept is not None:
            from .converted import fused_module_class

            cls = fused_module_class(cls, kept)
        batch_norm.__class__ = cls
        batch_norm.__dict__.update(_fusedres_original_class=original,
                                   _fusedres_activation=(activation, float(negative_slope)),
                                   fused_pattern=site_pattern(activation, with_residual))
        return batch_norm

    @staticmethod
    def unfuse(module: "BatchNormAct") -> nn.Module:
        """Back to the class it had before ``fuse`` (the same object, Parameters and buffers)."""
        original = module.__dict__.pop("_fusedres_original_class", nn.BatchNorm2d)
        for attribute in ("_fusedres_activation", "fused_pattern", "_fusedres_partner", "_fusedres_alone",
                          "activation", "negative_slope"):  # (the last two: pickles from before 2026-12-01)
            module.__dict__.pop(attribute, None)
        if not issubclass(original, (nn.SyncBatchNorm, SyncBatchNormAct2d)):  # (set by convert_sync_batchnorm)
            module.__dict__.pop("process_group", None)
        module.__class__ = original
        return module

    def __setstate__(self, state: dict) -> None:
        # Converted models pickled before 2026-12-01 kept the fused activation as plain attributes.
        state = dict(state)
        if "activation" in state:
            state["_fusedres_activation"] = (state.pop("activation"), float(state.pop("negative_slope", 0.01)))
        super().__setstate__(state)


class BatchNormAct1d(BatchNormAct, nn.BatchNorm1d):
    """``BatchNormAct`` on ``(N, C)`` or ``(N, C, L)`` inputs: an ``nn.BatchNorm1d``."""


class BatchNormAct2d(BatchNormAct, nn.BatchNorm2d):
    """``BatchNormAct`` on ``(N, C, H, W)`` inputs: an ``nn.BatchNorm2d``, with timm's ``BatchNormAct2d``
    signature and state_dict."""


class BatchNormAct3d(BatchNormAct, nn.BatchNorm3d):
    """``BatchNormAct`` on ``(N, C, D, H, W)`` inputs: an ``nn.BatchNorm3d``."""


class _WithReLU:
    """``BatchNormReLU1d`` / ``2d`` / ``3d``: ReLU, with nn.BatchNorm*d's constructor, state_dict and repr (no
    ``act`` or ``drop`` submodules: what conversion makes of a plain batch-norm)."""

    fused_pattern = BATCH_NORM_RELU

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True):
        super(BatchNormAct, self).__init__(num_features, eps=eps, momentum=momentum, affine=affine,  # nn's own
                                           track_running_stats=track_running_stats, device=device, dtype=dtype,
                                           **_bias_argument(type(self), bias))


class BatchNormReLU1d(_WithReLU, BatchNormAct1d):
    """``relu(batch_norm(input) [+ residual])`` with ``nn.BatchNorm1d``'s constructor and state_dict."""


class BatchNormReLU2d(_WithReLU, BatchNormAct2d):
    """``relu(batch_norm(input) [+ residual])`` with ``nn.BatchNorm2d``'s constructor and state_dict."""


class BatchNormReLU3d(_WithReLU, BatchNormAct3d):
    """``relu(batch_norm(input) [+ residual])`` with ``nn.BatchNorm3d``'s constructor and state_dict."""


class SyncBatchNormAct2d(BatchNormAct2d):
    """``act(batch_norm(input) [+ residual])`` with the statistics of the whole process group's batch when training
    under torch.distributed (``fusedres.distributed``): nn.SyncBatchNorm's constructor and state_dict, plus
    BatchNormAct2d's activation arguments. Any rank from 2, as nn.SyncBatchNorm (``convert_sync_batchnorm``
    synchronizes 1-D and 3-D batch-norms with it too). Deliberately not an nn.SyncBatchNorm: DistributedDataParallel
    refuses those in a CPU module, and this one also runs there (gloo). In evaluation, or in a single process (no
    process group, or one rank), it is a BatchNormAct2d: no communication. Every rank of ``process_group``
    (default: the world) must call it when training, as with nn.SyncBatchNorm; per-rank batch sizes may differ, an
    empty one included."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None, act_layer=nn.ReLU,
                 act_kwargs: dict | None = None, apply_act: bool = True, inplace: bool = True, drop_layer=None,
                 device=None, dtype=None, *, bias: bool = True):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, apply_act=apply_act, act_layer=act_layer,
                         act_kwargs=act_kwargs, inplace=inplace, drop_layer=drop_layer, device=device, dtype=dtype,
                         bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"{type(self).__name__}: expected at least 2D input (got {input.dim()}D input)")

    def _synchronized(self) -> bool:
        if not self.training or distributed.world_size(self.__dict__.get("process_group")) == 1:
            return False
        drop = self._modules.get("drop")
        if drop is not None and not isinstance(drop, nn.Identity):
            raise ValueError(f"{type(self).__name__}: a drop_layer between the batch-norm and the activation cannot "
                             f"be synchronized and fused; use nn.SyncBatchNorm followed by the drop layer and the "
                             f"activation")
        return True


class FrozenBatchNormAct2d(BatchNormAct):
    """``act(batch_norm(input) [+ residual])`` with frozen statistics and affine: an eval-mode batch-norm that also
    trains, as torchvision's ``FrozenBatchNorm2d`` (detection backbones) and timm's ``FrozenBatchNormAct2d`` are.
    ``weight``, ``bias``, ``running_mean`` and ``running_var`` are buffers (torchvision's state_dict; a checkpoint's
    ``num_batches_tracked`` is dropped, as there); the forward normalizes with the running statistics whatever the
    mode, the backward gives gradients to the input and the residual only, and nothing is ever written to the
    buffers. timm's ``FrozenBatchNormAct2d`` signature. Conversion makes torchvision's and timm's frozen
    batch-norms subclasses of this class and of their own (``fuse``)."""

    def __init__(self, num_features: int, eps: float = 1e-5, apply_act: bool = True, act_layer=nn.ReLU,
                 act_kwargs: dict | None = None, inplace: bool = True, drop_layer=None, device=None, dtype=None):
        nn.Module.__init__(self)
        self.num_features = num_features
        self.eps = eps
        factory = dict(device=device, dtype=dtype)
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self._add_activation(act_layer, act_kwargs, inplace, apply_act, drop_layer)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"{type(self).__name__}: expected 4D input (got {input.dim()}D input)")

    def _promoted(self, input: Tensor) -> Tensor:
        return frozen_input(input, self.weight)

    def _statistics(self) -> tuple[bool, Tensor | None, Tensor | None, float]:
        return False, self.running_mean, self.running_var, 0.0

    def _count_batch(self) -> Tensor | None:
        return None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # (a checkpoint of a trainable batch-norm)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def frozen_input(input: Tensor, weight: Tensor) -> Tensor:
    """The input of a frozen batch-norm in the dtype it computes in. torchvision's and timm's frozen batch-norms
    compute ``x * scale + bias`` with their buffers, so a half-precision input with fp32 buffers (autocast) gives an
    fp32 output: the input is cast (exactly) to the promoted dtype. (A cast pass that the kernels could fold into
    their loads: bench/NOTES.md.)"""
    dtype = torch.promote_types(input.dtype, weight.dtype)
    return input if dtype == input.dtype else input.to(dtype)


# Classes outside torch.nn that a fused module keeps as a base (``fuse``): (module, name) -> the base kept, and
# whether the original applies an activation of its own (an ``act`` submodule).
_KEPT_ORIGINALS = {
    ("timm.layers.norm_act", "BatchNormAct2d"): (("timm.layers.norm_act", "BatchNormAct2d"), True),
    # a synchronized one fused stays a subclass of BatchNormAct2d, not of SyncBatchNormAct, an nn.SyncBatchNorm:
    # DDP refuses those in CPU modules; timm's tools treat the two alike
    ("timm.layers.norm_act", "SyncBatchNormAct"): (("timm.layers.norm_act", "BatchNormAct2d"), True),
    ("timm.layers.norm_act", "FrozenBatchNormAct2d"): (("timm.layers.norm_act", "FrozenBatchNormAct2d"), True),
    ("torchvision.ops.misc", "FrozenBatchNorm2d"): (("torchvision.ops.misc", "FrozenBatchNorm2d"), False),
}
FROZEN_BATCH_NORMS = (("torchvision.ops.misc", "FrozenBatchNorm2d"), ("timm.layers.norm_act", "FrozenBatchNormAct2d"))


def class_key(kind: type) -> tuple[str, str]:
    return kind.__module__, kind.__name__


def kept_original_base(original: type) -> type | None:
    """The class a fused module keeps as a base for this original class (``_KEPT_ORIGINALS``), or None."""
    kept = _KEPT_ORIGINALS.get(class_key(original))
    return None if kept is None else getattr(importlib.import_module(kept[0][0]), kept[0][1])


def _has_own_activation(original: type) -> bool:
    kept = _KEPT_ORIGINALS.get(class_key(original))
    return (kept is not None and kept[1]) or issubclass(original, BatchNormAct)


def is_frozen_class(kind: type) -> bool:
    """torchvision's FrozenBatchNorm2d, timm's FrozenBatchNormAct2d, or fusedres's FrozenBatchNormAct2d."""
    return issubclass(kind, FrozenBatchNormAct2d) or class_key(kind) in FROZEN_BATCH_NORMS


def is_frozen_batch_norm(module: nn.Module) -> bool:
    """A frozen batch-norm (``is_frozen_class``), or what fusedres made of one."""
    return is_frozen_class(module.__dict__.get("_fusedres_original_class", type(module))) or is_frozen_class(
        type(module))


_BY_RANK = {1: (nn.BatchNorm1d, BatchNormAct1d, BatchNormReLU1d), 2: (nn.BatchNorm2d, BatchNormAct2d, BatchNormReLU2d),
            3: (nn.BatchNorm3d, BatchNormAct3d, BatchNormReLU3d)}


def fused_class_for(batch_norm: nn.Module, activation: str) -> type:
    """The class a batch-norm becomes when fused with ``activation``: synchronized or frozen if it was (``fuse``
    then derives the subclasses of classes outside torch.nn), else of its rank."""
    if isinstance(batch_norm, (nn.SyncBatchNorm, SyncBatchNormAct2d)):
        return SyncBatchNormAct2d
    if is_frozen_batch_norm(batch_norm):
        return FrozenBatchNormAct2d
    _, act_class, relu_class = next((classes for classes in _BY_RANK.values() if isinstance(batch_norm, classes[0])),
                                    _BY_RANK[2])
    if "act" in batch_norm._modules:  # timm's: it keeps its act module
        return act_class
    return relu_class if activation == "relu" else act_class


class AddReLU(nn.Module):
    """``relu(input + residual)`` through fusedres's fused kernel."""

    __prepare_scriptable__ = refuse_scripting

    def forward(self, input: Tensor, residual: Tensor) -> Tensor:
        traced = fx_leaf(self, (input, residual), {})
        return traced if traced is not None else FF.add_relu(input, residual)


def __getattr__(name: str):
    """Converted models pickled before 2026-12-01 name the conversion runtime here (their forwards import
    ``fusedres.modules.fused_site``; their stand-ins are ``fusedres.modules.ActivationFusedAway``)."""
    if name in ("fused_site", "ActivationFusedAway", "fuse_activation_module", "running_alone"):
        from . import converted

        return getattr(converted, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
