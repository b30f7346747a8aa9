"""Classes of blocks whose forward ``fusedres.convert`` rewrote.

A converted block stays an instance of its original class: its class becomes a subclass made here,
``Fused<Name>``, whose forward runs the rewritten code kept (as source) in the block itself. The subclasses are
importable by their qualified name, ``fusedres.converted.<qualname>``, which encodes the original class, so
converted models pickle and unpickle in a new process."""
from __future__ import annotations

import importlib

_PREFIX = "Fused["
_classes: dict[str, type] = {}
_forwards: dict[str, object] = {}


class ConvertedForward:
    """Mixin of the converted classes: forward runs the function compiled from
    ``self._fusedres_forward_source``. The source is what pickles; the function is rebuilt on unpickling (and
    deep copies), so that forward never compiles anything, which torch.compile could not trace."""

    _fusedres_unfused_class: type

    def forward(self, *args, **kwargs):
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


def compiled_forward(source: str):
    """The function a converted forward's source defines (compiled once per distinct source)."""
    function = _forwards.get(source)
    if function is None:
        namespace: dict = {}
        exec(compile(source, "<fusedres converted forward>", "exec"), namespace)
        function = _forwards[source] = namespace["forward"]
    return function


def _key(base: type) -> str:
    return f"{_PREFIX}{base.__module__.replace('.', '/')}:{base.__qualname__.replace('.', '/')}]"


def fused_class(base: type) -> type:
    """The converted subclass of ``base`` (made once, then reused)."""
    key = _key(base)
    if key not in _classes:
        _classes[key] = type(f"Fused{base.__name__}", (ConvertedForward, base),
                             {"__module__": __name__, "__qualname__": key, "_fusedres_unfused_class": base})
    return _classes[key]


def __getattr__(name: str):
    """Unpickling looks the classes up here by qualified name: rebuild them from the original class."""
    if not (name.startswith(_PREFIX) and name.endswith("]")):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_path, qualname = name[len(_PREFIX):-1].split(":")
    base = importlib.import_module(module_path.replace("/", "."))
    for part in qualname.split("/"):
        base = getattr(base, part)
    return fused_class(base)
