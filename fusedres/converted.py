"""Classes that ``fusedres.convert`` gives to modules it changes in place.

A converted block stays an instance of its original class: its class becomes a subclass made here,
``Fused<Name>``, whose forward runs the rewritten code kept (as source) in the block itself. A timm
``BatchNormAct2d`` fused in place becomes a subclass of fusedres's fused class and of timm's
(``fused_module_class``), so that timm's tools still know it. The subclasses are importable by their qualified
name, ``fusedres.converted.<qualname>``, which encodes the classes they derive from, so converted models pickle
and unpickle in a new process."""
from __future__ import annotations

import functools
import importlib
import math
import warnings

import torch

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
        from .modules import refuse_scripting

        refuse_scripting(self)

    def forward(self, *args, **kwargs):  # (each converted class has one with its original's signature: _forward_of)
        return self._converted_forward(*args, **kwargs)

    def _converted_forward(self, *args, **kwargs):
        changed = _changed_attribute(self)
        if changed is not None:
            from .modules import running_alone

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
_warned: set = set()


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
    if (kind, name) not in _warned:
        _warned.add((kind, name))
        warnings.warn(f"fusedres: {kind}.{name} differs from its value at conversion, which the converted forward "
                      f"was traced with; this block now runs its original forward, unfused (exact). Convert again "
                      f"(fusedres.convert) to fuse it with the new value.", stacklevel=3)


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
    """A subclass of the fused module class ``fused`` and of ``original`` (timm's BatchNormAct2d; an activation's
    class for its ActivationFusedAway): fused's forward, and an instance of original for the code that looks for
    it (made once, then reused)."""
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
