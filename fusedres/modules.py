"""The public modules: ``BatchNormAct2d`` (an ``nn.BatchNorm2d`` that applies an activation, after an optional
residual add; timm's ``BatchNormAct2d`` signature and state_dict), ``BatchNormReLU2d`` (the same with ReLU),
``SyncBatchNormAct2d`` and ``AddReLU``, and the call-time checks they share with what conversion leaves in a
model (``fusedres/converted.py``): whether hooks watch a module (``hooks_active``), whether a torch.fx trace is
running (``tracing``, ``fx_leaf``).

A module's activation is read at every call: from its ``act`` (timm's semantics), from the activation module
conversion fused into it, or from what conversion recorded. A converted batch-norm is called by its site
(``converted.fused_site``) with the site's activation, or alone (``activation="identity"``). Under torch.fx
symbolic tracing a fused module records itself as one call, doing what the original module did (a plain
batch-norm: no activation)."""
from __future__ import annotations

import importlib
import warnings
from typing import Any, Optional

from torch import Tensor, fx, nn

from . import distributed, ops
from . import functional as FF
from .activations import ACTIVATIONS, activation_class, describe_activation

__all__ = ["BatchNormAct2d", "BatchNormReLU2d", "SyncBatchNormAct2d", "AddReLU", "fused_class_for", "site_pattern"]

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
            raise ValueError(f"BatchNormAct2d: unsupported activation {act_layer!r}; supported: "
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
    return module is not None and bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                                       or module._backward_pre_hooks)


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


class BatchNormAct2d(nn.BatchNorm2d):
    """``act(batch_norm(input) [+ residual])`` through fusedres's fused kernels, ``act`` one of
    ``fusedres.functional.ACTIVATIONS``.

    timm's ``BatchNormAct2d`` signature and state_dict, and ``nn.BatchNorm2d``'s bookkeeping
    (``num_batches_tracked``, ``momentum=None`` as a cumulative average computed on the device,
    ``track_running_stats=False``, ``affine=False``, checkpoints without ``num_batches_tracked``). ``act_layer``:
    the activation's ``nn.Module`` class (torch's or timm's), an instance, or its name (fusedres's or timm's, built
    as timm builds it); ``apply_act=False``: the identity. The activation is read from ``act`` at every call, so a
    module swapped in or an attribute changed later is applied; one fusedres does not fuse (``nn.ELU``, say) runs
    after the fused batch-norm, unfused, with a warning. A ``drop_layer`` sits between the batch-norm and the
    activation, where no kernel can fuse it: such a module runs the activation unfused, and says so when built."""

    #: which fused pattern this module serves; set by conversion
    fused_pattern = BATCH_NORM_ACT
    __prepare_scriptable__ = refuse_scripting
    # Class-level default of what the module applies without an ``act`` module or a fused-away partner; conversion
    # turns plain batch-norms into this class in place, without __init__, and records the site's in __dict__.
    _fusedres_activation = ("relu", 0.01)

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
                             f"{', '.join(ACTIVATIONS)} (or their nn.Module classes, or timm's names)")
        if drop_layer is not None:
            warnings.warn(f"BatchNormAct2d: a drop_layer ({type(self.drop).__name__}) between the batch-norm and "
                          f"the activation cannot be fused; this module runs the activation unfused", stacklevel=2)

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
        return original is not None and _timm_norm_act_base(original) is None and not issubclass(original,
                                                                                                  BatchNormAct2d)

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
        momentum = 0.0 if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if keep_running else None
        running_var = self.running_var if keep_running else None
        synchronized = self._synchronized()
        # Checked before num_batches_tracked moves: a call that raises leaves the module as it was. (A synchronized
        # batch-norm's values per channel are the whole group's.)
        FF.validate_batch_norm_act(name, input, residual, running_mean, running_var, self.weight, self.bias,
                                   use_batch_stats, momentum, self.eps, activation, negative_slope,
                                   values_per_channel_known=not synchronized)
        num_batches_tracked = None
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average: factor 1 / num_batches_tracked, on the device
                num_batches_tracked = self.num_batches_tracked
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

    def _synchronized(self) -> bool:
        """Whether this call normalizes with a process group's statistics (SyncBatchNormAct2d)."""
        return False

    @classmethod
    def fuse(cls, batch_norm: nn.BatchNorm2d, activation: str = "relu", negative_slope: float = 0.01,
             with_residual: bool = False, original: type | None = None) -> "BatchNormAct2d":
        """Turn an ``nn.BatchNorm2d`` (or ``nn.SyncBatchNorm``, or timm's BatchNormAct2d) into this class in place:
        the same object, Parameters and buffers; ``revert`` gives back its original class (``original``: the class
        revert should give instead, e.g. nn.SyncBatchNorm for a batch-norm that convert_sync_batchnorm
        synchronizes). A timm BatchNormAct2d becomes a subclass of this class and of timm's, so that timm's tools
        (``freeze_batch_norm_2d``, ``convert_sync_batchnorm``) still see its activation."""
        original = original or batch_norm.__dict__.get("_fusedres_original_class", type(batch_norm))
        if not isinstance(batch_norm, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            raise TypeError(f"{cls.__name__}.fuse: expected an nn.BatchNorm2d or nn.SyncBatchNorm, got "
                            f"{type(batch_norm).__name__}")
        timm_class = _timm_norm_act_base(original)
        if timm_class is not None:
            from .converted import fused_module_class

            cls = fused_module_class(cls, timm_class)
        batch_norm.__class__ = cls
        batch_norm.__dict__.update(_fusedres_original_class=original,
                                   _fusedres_activation=(activation, float(negative_slope)),
                                   fused_pattern=site_pattern(activation, with_residual))
        return batch_norm

    @staticmethod
    def unfuse(module: "BatchNormAct2d") -> nn.BatchNorm2d:
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


_TIMM_NORM_ACT = ("timm.layers.norm_act", ("BatchNormAct2d", "SyncBatchNormAct"))


def _timm_norm_act_base(original: type) -> type | None:
    """timm's BatchNormAct2d class if ``original`` is it or timm's SyncBatchNormAct, else None. (A synchronized one
    fused stays a subclass of BatchNormAct2d, not of SyncBatchNormAct, an nn.SyncBatchNorm: DDP refuses those in
    CPU modules; timm's tools treat the two alike.)"""
    module, names = _TIMM_NORM_ACT
    if original.__module__ == module and original.__name__ in names:
        return importlib.import_module(module).BatchNormAct2d
    return None


def fused_class_for(batch_norm: nn.Module, activation: str) -> type:
    """The class a batch-norm becomes when fused with ``activation``: synchronized if it was (``fuse`` then
    derives timm's subclasses)."""
    if isinstance(batch_norm, (nn.SyncBatchNorm, SyncBatchNormAct2d)):
        return SyncBatchNormAct2d
    if "act" in batch_norm._modules:  # timm's: it keeps its act module
        return BatchNormAct2d
    return BatchNormReLU2d if activation == "relu" else BatchNormAct2d


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
