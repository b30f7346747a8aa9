"""Modules: ``BatchNormAct2d`` (an ``nn.BatchNorm2d`` that applies an activation, after an optional residual add;
timm's ``BatchNormAct2d`` signature and state_dict), ``BatchNormReLU2d`` (the same with ReLU) and ``AddReLU``, plus
the pieces conversion leaves in a model: ``ActivationFusedAway``, standing where an activation module was fused
into the batch-norm before it, and ``fused_site``, through which rewritten forwards call their fused batch-norms.

A converted model must keep computing what the original would whatever is done to it later (docs/design.md,
"Conversion"), so every fused site decides at call time, from what it finds then, whether it can run fused: the
activation is read from the activation module when there is one (a module replaced, or an attribute such as
``negative_slope`` changed, is seen), a residual must have the batch-norm output's shape, and no hook may be
watching the modules the fusion would skip (a hook on the batch-norm, on the activation module, or a global
one). Otherwise the site runs unfused, each module called as the original forward called it, hooks firing as
they would; a tool that swapped the fused batch-norm for another module (SyncBatchNorm, a frozen batch-norm)
gets the same, with a warning. Under torch.fx symbolic tracing (``create_feature_extractor``) a converted model
traces as its original: each module it had is one node of its own name (``_fx_leaf``), the batch-norm alone, the
add and the activation; the traced graph computes what the original computes, unfused (convert it to fuse it)."""
from __future__ import annotations

import contextlib
import importlib
import warnings
from typing import Any, Optional

from torch import Tensor, fx, nn

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
    """The activation module timm's BatchNormAct2d would hold (``act``), built as timm builds it: a name through
    timm's own table when timm is installed (else the torch module of that name), a class with
    ``inplace`` and ``act_kwargs`` (without ``inplace`` if it takes none), an instance as it is."""
    if not apply_act or act_layer is None:
        return nn.Identity()
    if isinstance(act_layer, nn.Module):
        return act_layer
    if isinstance(act_layer, str):
        described = describe_activation(act_layer)
        if described is None:
            raise ValueError(f"BatchNormAct2d: unsupported activation {act_layer!r}; supported: "
                             f"{', '.join(FF.ACTIVATIONS)} (or their nn.Module classes, or timm's names)")
        act_layer = _timm_activation_class(act_layer) or _ACTIVATION_MODULES[described[0]]
        if act_layer is None:  # timm's name for no activation
            return nn.Identity()
    kwargs = {"inplace": inplace, **(act_kwargs or {})}  # as timm passes it; meaningless once fused
    try:
        return act_layer(**kwargs)
    except TypeError:  # an activation without an inplace argument
        kwargs.pop("inplace")
        return act_layer(**kwargs)


def _timm_activation_class(name: str):
    """timm's class for the activation ``name`` (timm.layers.get_act_layer), or None without timm or the name."""
    try:
        from timm.layers import get_act_layer
    except ImportError:
        return None
    try:
        return get_act_layer(name) or nn.Identity
    except KeyError:
        return None


class _GELUTanh(nn.GELU):
    """nn.GELU with the tanh approximation, built as the other classes are (timm's GELUTanh when timm exists)."""

    def __init__(self, inplace: bool = False):
        super().__init__(approximate="tanh")


_ACTIVATION_MODULES = {"identity": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "leaky_relu": nn.LeakyReLU,
                       "silu": nn.SiLU, "gelu": nn.GELU, "gelu_tanh": _GELUTanh, "hardswish": nn.Hardswish,
                       "mish": nn.Mish}


def _hooks_active(*modules: nn.Module | None) -> bool:
    """Whether a call of these modules would run hooks (their own, or global ones): a fused site that skips the
    call of one of them, or shows it another output, must then run unfused."""
    from torch.nn.modules import module as torch_module

    if (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
            or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks):
        return True
    return any(_own_hooks(m) for m in modules)


def _own_hooks(module: nn.Module | None) -> bool:
    return module is not None and bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                                       or module._backward_pre_hooks)


def _tracing(*args) -> bool:
    """Whether these arguments are torch.fx Proxies (a symbolic trace is running)."""
    return any(isinstance(a, fx.Proxy) for a in args)


def _fx_leaf(module: nn.Module, args: tuple, kwargs: dict):
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


def _warn_once(key: str, message: str) -> None:
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
                             f"{', '.join(FF.ACTIVATIONS)} (or their nn.Module classes, or timm's names)")
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
                and not _hooks_active(act, drop))

    def fuses_partner(self) -> bool:
        """Whether this call applies the activation of the module conversion fused away after it (an
        ActivationFusedAway, which then passes its input through): it must still stand where the activation was,
        nothing may be hooked on the two, and its activation must still be one fusedres fuses."""
        partner = self.__dict__.get("_fusedres_partner")
        if partner is None:
            return False
        activation_module = partner.activation_module
        return (partner.stands_in_place() and not _hooks_active(self, partner, activation_module)
                and describe_activation(activation_module) is not None)

    def forward(self, input: Tensor, residual: Optional[Tensor] = None, *, activation: str | None = None,
                negative_slope: float = 0.01) -> Tensor:
        """act(batch_norm(input) [+ residual]); ``activation`` (with ``negative_slope``): the site's, which
        converted forwards pass (``fused_site``), else the module's own (``own_activation``)."""
        if self.__dict__.get("_fusedres_alone"):  # the batch-norm alone (running_alone)
            activation, negative_slope = "identity", 0.01
        if _tracing(input, residual):  # one node, doing what the original module did (a plain one: no activation)
            if activation is None and self.was_plain_batch_norm():
                activation, negative_slope = "identity", 0.01
            return _fx_leaf(self, (input, residual), {} if activation is None else
                            dict(activation=activation, negative_slope=negative_slope))
        self._check_input_dim(input)
        name = type(self).__name__
        drop = self._modules.get("drop")
        unfused_activation = False
        if activation is None:
            own = self.own_activation()
            # its act (and drop) run as modules when they are not fusable, or hooked
            unfused_activation = (own is None or (drop is not None and not isinstance(drop, nn.Identity))
                                  or ("act" in self._modules and _hooks_active(self.act, drop)))
            if own is None:
                _warn_once(f"act:{type(self.act).__name__}",
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
        FF._check_batch_norm_act(name, input, residual, running_mean, running_var, self.weight, self.bias,
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
            out = FF._batch_norm_act(name, input, residual, running_mean, running_var, self.weight, self.bias,
                                     use_batch_stats, momentum, self.eps, activation, negative_slope,
                                     num_batches_tracked=num_batches_tracked)
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
        traced = _fx_leaf(self, (input, residual), {})
        return traced if traced is not None else FF.add_relu(input, residual)


def _warn_unfused(module: nn.Module) -> None:
    kind = type(module).__name__
    _warn_once(f"replaced:{kind}",
               f"fusedres: a fused batch-norm was replaced by a {kind} (e.g. by nn.SyncBatchNorm's "
               f"convert_sync_batchnorm or a batch-norm freezer); its sites now run batch-norm, add and activation "
               f"unfused: exact, but without the fused kernels. For synchronized batch-norm use "
               f"fusedres.convert_sync_batchnorm, which keeps them fused; for other tools, call fusedres.revert "
               f"before them and fusedres.convert after them.")


@contextlib.contextmanager
def running_alone(batch_norms):
    """Inside the block, these fused batch-norms compute the batch-norm alone when called, as the plain
    batch-norms they were (a converted block falling back to its original forward)."""
    saved = [(m, m.__dict__.get("_fusedres_alone")) for m in batch_norms if isinstance(m, BatchNormAct2d)]
    for module, _ in saved:
        module.__dict__["_fusedres_alone"] = True
    try:
        yield
    finally:
        for module, previous in saved:
            if previous is None:
                module.__dict__.pop("_fusedres_alone", None)
            else:
                module.__dict__["_fusedres_alone"] = previous


def fused_site(batch_norm: nn.Module, input: Tensor, residual: Optional[Tensor] = None, activation: str = "relu",
               negative_slope: float = 0.01, activation_module: nn.Module | None = None) -> Tensor:
    """A site of a converted forward: act(batch_norm(input) [+ residual]). ``activation_module``: the module the
    original forward called for the activation, looked up at call time (its activation is read from it then);
    else ``activation`` and ``negative_slope``, the function's. Fused when the batch-norm is still a
    BatchNormAct2d, the activation one fusedres fuses, a residual of the batch-norm output's shape, and no hook
    watches the batch-norm or the activation module; otherwise unfused, each module called as the original forward
    called it (exact)."""
    if activation_module is not None:
        activation, negative_slope = describe_activation(activation_module) or (None, 0.01)
    tracing = _tracing(input, residual)  # the original's nodes: batch-norm, add, activation (module docstring)
    fusable = isinstance(batch_norm, BatchNormAct2d) and activation is not None and not tracing
    if fusable and residual is not None:
        fusable = isinstance(residual, Tensor) and residual.shape == input.shape  # else eager broadcasts
    if fusable and batch_norm.applies_only_own_activation() and not _hooks_active(batch_norm, activation_module):
        return batch_norm(input, residual, activation=activation, negative_slope=negative_slope)
    if isinstance(batch_norm, BatchNormAct2d):
        if not tracing:
            _warn_once("site", "fusedres: a converted site runs unfused (exact, slower): a hook watches its "
                               "batch-norm or activation module, its activation module is one fusedres does not "
                               "fuse, or its residual broadcasts; each such site is exact while that lasts")
        # the batch-norm as the original forward called it: alone, or with its own (timm) act
        out = batch_norm(input) if "act" in batch_norm._modules else batch_norm(input, activation="identity")
    else:
        _warn_unfused(batch_norm)
        out = batch_norm(input)
    if residual is not None:
        out = out + residual
    if activation_module is not None:
        return activation_module(out)
    return EAGER_ACTIVATIONS[activation](out, negative_slope)


class ActivationFusedAway(nn.Module):
    """Stands where an activation module was whose work the batch-norm before it (``parent.<batch_norm_name>``,
    a BatchNormAct2d) now does, while that batch-norm ``fuses_partner()``; otherwise (the batch-norm replaced by
    a module that does not apply it, a hook on either, the activation changed to one fusedres does not fuse) it
    applies the activation module itself (exact). Attributes of the activation module (``negative_slope``,
    ``inplace``...) are read and written through it. ``fusedres.revert`` puts the activation module back."""

    __prepare_scriptable__ = refuse_scripting

    def __init__(self, activation: nn.Module, parent: nn.Module, batch_norm_name: str, activation_name: str):
        nn.Module.__init__(self)
        # Plain attributes, not submodules: no state_dict entries, no second path to the parent.
        self.__dict__["activation_module"] = activation
        self.__dict__["parent"] = parent
        self.__dict__["batch_norm_name"] = batch_norm_name
        self.__dict__["activation_name"] = activation_name
        self.training = activation.training

    @classmethod
    def standing_for(cls, activation: nn.Module, parent: nn.Module, batch_norm_name: str,
                     activation_name: str) -> "ActivationFusedAway":
        """A stand-in that is also an instance of ``activation``'s class (code that finds activations by type,
        to replace them, finds it), made from that class and this one (``fusedres.converted``)."""
        from .converted import fused_module_class

        kind = fused_module_class(cls, type(activation)) if not isinstance(activation, cls) else cls
        stand_in = kind.__new__(kind)
        cls.__init__(stand_in, activation, parent, batch_norm_name, activation_name)
        return stand_in

    def stands_in_place(self) -> bool:
        """Whether this module is still where the activation module was."""
        return self.__dict__["parent"]._modules.get(self.__dict__.get("activation_name")) is self

    def forward(self, input: Tensor, *, apply: bool = False) -> Tensor:
        """The input as it is while the batch-norm fuses this activation; else (or ``apply``) the activation."""
        if _tracing(input):  # the original's node: the activation, applied (the batch-norm's node did not)
            return _fx_leaf(self, (input,), {"apply": True})
        batch_norm = self.__dict__["parent"]._modules.get(self.__dict__["batch_norm_name"])
        if apply:
            pass
        elif isinstance(batch_norm, BatchNormAct2d):
            partner = batch_norm.__dict__.get("_fusedres_partner")
            # (no partner: converted before 2026-12-01, when the batch-norm always applied the activation). A
            # DataParallel replica has its own stand-in holding the same activation module.
            if partner is None or (partner.__dict__["activation_module"] is self.__dict__["activation_module"]
                                   and batch_norm.fuses_partner()):
                return input
        else:
            _warn_unfused(batch_norm)
        # Its call fires the hooks of the activation module's place (global ones included); the module's own
        # (registered on it before a conversion in place) fire only if it has some.
        activation_module = self.__dict__["activation_module"]
        return activation_module(input) if _own_hooks(activation_module) else activation_module.forward(input)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["activation_module"], name)

    def __setattr__(self, name: str, value) -> None:
        module = self.__dict__.get("activation_module")
        if module is not None and name == "training":  # train() and eval() reach the activation module too
            module.training = value
        if module is not None and name != "training" and not name.startswith("_") and hasattr(module, name):
            setattr(module, name, value)
        else:
            super().__setattr__(name, value)

    def extra_repr(self) -> str:
        return f"{self.__dict__['activation_module']!r} fused into {self.__dict__['batch_norm_name']}"


def fuse_activation_module(parent: nn.Module, batch_norm_name: str, activation_name: str) -> None:
    """``parent.<batch_norm_name>`` (an nn.BatchNorm2d) takes over the work of ``parent.<activation_name>`` (a
    module that ``describe_activation`` knows): the batch-norm becomes a BatchNormAct2d (a BatchNormReLU2d for
    ReLU) in place, the activation module an ActivationFusedAway, each knowing the other. Idempotent."""
    activation_module = parent._modules[activation_name]
    if isinstance(activation_module, ActivationFusedAway):
        return
    activation, negative_slope = describe_activation(activation_module)
    batch_norm = parent._modules[batch_norm_name]
    fused_class_for(batch_norm, activation).fuse(batch_norm, activation, negative_slope)
    stand_in = ActivationFusedAway.standing_for(activation_module, parent, batch_norm_name, activation_name)
    parent._modules[activation_name] = stand_in
    batch_norm.__dict__["_fusedres_partner"] = stand_in
