"""What ``fusedres.convert`` leaves in a model, and how it runs (docs/design.md, "Conversion").

- Sites: ``fused_site``, the call a rewritten forward makes for each batch-norm [+ add] + activation;
  ``ActivationFusedAway``, the stand-in for an activation module fused into the batch-norm before it
  (``fuse_activation_module``); ``running_alone``. Each decides at call time whether it can run fused.
- Classes: a converted block stays an instance of its original class: its class becomes a subclass made here,
  ``Fused<Name>``, whose forward runs the rewritten code kept (as source) in the block itself, and falls back to
  the original forward when an attribute its trace read has changed. A batch-norm of a class outside torch.nn
  (timm's ``BatchNormAct2d``, torchvision's ``FrozenBatchNorm2d``...) fused in place
  (and an activation's stand-in) becomes a subclass of fusedres's class and of the original's
  (``fused_module_class``), so that the tools and loops looking for the original class still find it. The
  subclasses are importable by their qualified name, ``fusedres.converted.<qualname>``, which encodes the classes
  they derive from, so converted models pickle and unpickle in a new process."""
from __future__ import annotations

import contextlib
import functools
import importlib
import math
from typing import Optional

import torch
from torch import Tensor, nn

from .activations import describe_activation, eager_activation
from .modules import (BatchNormAct, fused_class_for, fx_leaf, hooks_active, own_hooks, refuse_scripting, tracing,
                      warn_once)

_PREFIX = "Fused["
_classes: dict[str, type] = {}
_forwards: dict[str, object] = {}


class ConvertedForward:
    """Mixin of the converted classes: forward runs the function compiled from
    ``self._fusedres_forward_source``. The source is what pickles; the function is rebuilt on unpickling (and
    deep copies), so that forward never compiles anything, which torch.compile could not trace.

    The trace froze what the forward read from the block's own attributes (``_fusedres_frozen``: a flag such as
    ``use_res``, a rate, a slope, an optional submodule that was None): when one of them differs at call time, the
    block runs its original forward instead, its fused batch-norms computing the batch-norm alone (exact, and
    unfused, with a warning)."""

    _fusedres_unfused_class: type

    def __prepare_scriptable__(self):
        refuse_scripting(self)

    def forward(self, *args, **kwargs):  # (each converted class has one with its original's signature: _forward_of)
        return self._converted_forward(*args, **kwargs)

    def _converted_forward(self, *args, **kwargs):
        changed = _changed_attribute(self)
        if changed is not None:
            _warn_changed(type(self).__name__, changed)
            sites = [self.get_submodule(name) for name in self.__dict__.get("_fusedres_site_batch_norms", ())]
            with running_alone(sites):
                return self._fusedres_unfused_class.forward(self, *args, **kwargs)
        return self.__dict__["_fusedres_forward"](self, *args, **kwargs)

    def set_forward_source(self, source: str) -> None:
        self.__dict__["_fusedres_forward_source"] = source
        self.__dict__["_fusedres_forward"] = compiled_forward(source)

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state.pop("_fusedres_forward", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.set_forward_source(state["_fusedres_forward_source"])


_MISSING = object()


def _changed_attribute(block) -> str | None:
    """The first attribute the trace froze whose value differs now, or None."""
    for name, value in block.__dict__.get("_fusedres_frozen", {}).items():
        now = getattr(block, name, _MISSING)
        if not same_value(now, value):
            return name
    return None


def same_value(a, b) -> bool:
    """Whether a frozen attribute still holds what the trace saw: the same object, or an equal value of the same
    type (tensors: the same object only)."""
    if a is b:
        return True
    if type(a) is not type(b) or isinstance(a, torch.Tensor):
        return False
    try:
        return bool(a == b) or (isinstance(a, float) and math.isnan(a) and math.isnan(b))
    except Exception:  # an element whose == does not give a truth value (a tensor in a tuple)
        return False


def _warn_changed(kind: str, name: str) -> None:
    warn_once(f"changed:{kind}.{name}",
              f"fusedres: {kind}.{name} differs from its value at conversion, which the converted forward was traced "
              f"with; this block now runs its original forward, unfused (exact). Convert again (fusedres.convert) "
              f"to fuse it with the new value.")


def compiled_forward(source: str):
    """The function a converted forward's source defines (compiled once per distinct source)."""
    function = _forwards.get(source)
    if function is None:
        namespace: dict = {}
        exec(compile(source, "<fusedres converted forward>", "exec"), namespace)
        function = _forwards[source] = namespace["forward"]
    return function


def _name(cls: type) -> str:
    return f"{cls.__module__.replace('.', '/')}:{cls.__qualname__.replace('.', '/')}"


def _class_named(name: str) -> type:
    module_path, qualname = name.split(":")
    cls = importlib.import_module(module_path.replace("/", "."))
    for part in qualname.split("/"):
        cls = getattr(cls, part)
    return cls


def _forward_of(base: type):
    """ConvertedForward's forward with ``base.forward``'s signature: torch.fx traces a root module's forward from
    its signature (``functools.wraps`` exposes the original one)."""
    @functools.wraps(base.forward)
    def forward(self, *args, **kwargs):
        return self._converted_forward(*args, **kwargs)
    return forward


def fused_class(base: type) -> type:
    """The converted subclass of ``base`` (made once, then reused)."""
    key = f"{_PREFIX}{_name(base)}]"
    if key not in _classes:
        _classes[key] = type(f"Fused{base.__name__}", (ConvertedForward, base),
                             {"__module__": __name__, "__qualname__": key, "_fusedres_unfused_class": base,
                              "forward": _forward_of(base)})
    return _classes[key]


def fused_module_class(fused: type, original: type) -> type:
    """A subclass of the fused module class ``fused`` and of ``original`` (``modules.kept_original_base``: timm's
    BatchNormAct2d, a frozen batch-norm; an activation's class for its ActivationFusedAway): fused's forward, and an
    instance of original for the code that looks for it (made once, then reused)."""
    key = f"{_PREFIX}{_name(fused)}+{_name(original)}]"
    if key not in _classes:
        _classes[key] = type(fused.__name__, (fused, original),
                             {"__module__": __name__, "__qualname__": key})
    return _classes[key]


def __getattr__(name: str):
    """Unpickling looks the classes up here by qualified name: rebuild them from the classes the name encodes."""
    if not (name.startswith(_PREFIX) and name.endswith("]")):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    names = name[len(_PREFIX):-1].split("+")
    if len(names) == 2:
        return fused_module_class(*map(_class_named, names))
    return fused_class(_class_named(names[0]))


# --- Sites ----------------------------------------------------------------------------------------------


def _warn_unfused(module: nn.Module) -> None:
    kind = type(module).__name__
    warn_once(f"replaced:{kind}",
              f"fusedres: a fused batch-norm was replaced by a {kind} (e.g. by nn.SyncBatchNorm's "
              f"convert_sync_batchnorm or a batch-norm freezer); its sites now run batch-norm, add and activation "
              f"unfused: exact, but without the fused kernels. For synchronized batch-norm use "
              f"fusedres.convert_sync_batchnorm, which keeps them fused; for other tools, call fusedres.revert "
              f"before them and fusedres.convert after them.")


@contextlib.contextmanager
def running_alone(batch_norms):
    """Inside the block, these fused batch-norms compute the batch-norm alone when called, as the plain
    batch-norms they were (a converted block falling back to its original forward)."""
    saved = [(m, m.__dict__.get("_fusedres_alone")) for m in batch_norms if isinstance(m, BatchNormAct)]
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
    BatchNormAct, the activation one fusedres fuses, a residual of the batch-norm output's shape, and no hook
    watches the batch-norm or the activation module; otherwise unfused, each module called as the original forward
    called it (exact)."""
    if activation_module is not None:
        activation, negative_slope = describe_activation(activation_module) or (None, 0.01)
    traced = tracing(input, residual)  # the original's nodes: batch-norm, add, activation (fusedres.modules)
    fusable = isinstance(batch_norm, BatchNormAct) and activation is not None and not traced
    if fusable and residual is not None:
        fusable = isinstance(residual, Tensor) and residual.shape == input.shape  # else eager broadcasts
    if fusable and batch_norm.applies_only_own_activation() and not hooks_active(batch_norm, activation_module):
        return batch_norm(input, residual, activation=activation, negative_slope=negative_slope)
    if isinstance(batch_norm, BatchNormAct):
        if not traced:
            warn_once("site", "fusedres: a converted site runs unfused (exact, slower): a hook watches its "
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
    return eager_activation(activation, out, negative_slope)


class ActivationFusedAway(nn.Module):
    """Stands where an activation module was whose work the batch-norm before it (``parent.<batch_norm_name>``,
    a BatchNormAct) now does, while that batch-norm ``fuses_partner()``; otherwise (the batch-norm replaced by
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
        kind = fused_module_class(cls, type(activation)) if not isinstance(activation, cls) else cls
        stand_in = kind.__new__(kind)
        cls.__init__(stand_in, activation, parent, batch_norm_name, activation_name)
        return stand_in

    def stands_in_place(self) -> bool:
        """Whether this module is still where the activation module was."""
        return self.__dict__["parent"]._modules.get(self.__dict__.get("activation_name")) is self

    def forward(self, input: Tensor, *, apply: bool = False) -> Tensor:
        """The input as it is while the batch-norm fuses this activation; else (or ``apply``) the activation."""
        if tracing(input):  # the original's node: the activation, applied (the batch-norm's node did not)
            return fx_leaf(self, (input,), {"apply": True})
        batch_norm = self.__dict__["parent"]._modules.get(self.__dict__["batch_norm_name"])
        if apply:
            pass
        elif isinstance(batch_norm, BatchNormAct):
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
        return activation_module(input) if own_hooks(activation_module) else activation_module.forward(input)

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
    """``parent.<batch_norm_name>`` (a batch-norm) takes over the work of ``parent.<activation_name>`` (a
    module that ``describe_activation`` knows): the batch-norm becomes a BatchNormAct (``fused_class_for``: of its
    rank, a BatchNormReLU*d for ReLU, or frozen) in place, the activation module an ActivationFusedAway, each
    knowing the other. Idempotent."""
    activation_module = parent._modules[activation_name]
    if isinstance(activation_module, ActivationFusedAway):
        return
    activation, negative_slope = describe_activation(activation_module)
    batch_norm = parent._modules[batch_norm_name]
    fused_class_for(batch_norm, activation).fuse(batch_norm, activation, negative_slope)
    stand_in = ActivationFusedAway.standing_for(activation_module, parent, batch_norm_name, activation_name)
    parent._modules[activation_name] = stand_in
    batch_norm.__dict__["_fusedres_partner"] = stand_in
