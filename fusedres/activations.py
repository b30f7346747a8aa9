"""The activations fusedres fuses, in one table: for each, its name, the eager expression it stands for, the
``nn.Module`` classes (torch's and timm's) and the functions that compute it, the other names it goes by (timm's),
and whether its derivative can be read from its output. Everything else reads this table: the kernels
(``fusedres/kernels/activations.py`` holds each one's formula and derivative), the public functions, the modules,
``convert``, the benchmark and the kernel report. Adding an activation is an entry here plus its formula and
derivative there (``tests/test_registry.py`` checks that every consumer sees the same set).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_TIMM = ("timm.layers.activations", "timm.layers.activations_me")
_TORCH = "torch.nn.modules.activation"


@dataclass(frozen=True)
class Activation:
    name: str
    eager: Callable[[Tensor, float], Tensor]  # act(z), leaky_relu's slope the second argument (the others ignore it)
    module_class: type  # the torch module built for this name where timm's table is not at hand
    module_classes: tuple[tuple[str, str], ...] = ()  # (module, class name) of every module class computing it
    functions: tuple = ()  # torch functions computing it with their defaults (convert recognises their calls)
    methods: tuple[str, ...] = ()  # Tensor methods computing it (x.relu())
    aliases: tuple[str, ...] = ()  # other names (timm's)
    # Its derivative read from its output y: y > 0 (ReLU) or 0 < y < 6 (ReLU6) exactly where z is; with a residual
    # the backward then reads the saved output instead of recomputing z from the input and the residual.
    derivative_from_output: bool = False


class GELUTanh(nn.GELU):
    """nn.GELU with the tanh approximation, built as the other classes are (timm's GELUTanh where timm exists)."""

    def __init__(self, inplace: bool = False):
        super().__init__(approximate="tanh")


TABLE = (
    Activation("identity", lambda z, slope: z, nn.Identity, (("torch.nn.modules.linear", "Identity"),),
               aliases=("", "none")),
    Activation("relu", lambda z, slope: torch.relu(z), nn.ReLU, ((_TORCH, "ReLU"),),
               functions=(torch.relu, torch.relu_, F.relu, F.relu_), methods=("relu", "relu_"),
               derivative_from_output=True),
    Activation("relu6", lambda z, slope: F.relu6(z), nn.ReLU6, ((_TORCH, "ReLU6"),), functions=(F.relu6,),
               derivative_from_output=True),
    Activation("leaky_relu", lambda z, slope: F.leaky_relu(z, slope), nn.LeakyReLU, ((_TORCH, "LeakyReLU"),),
               functions=(F.leaky_relu, F.leaky_relu_)),
    Activation("silu", lambda z, slope: F.silu(z), nn.SiLU,
               ((_TORCH, "SiLU"), *((m, n) for m in _TIMM for n in ("Swish", "SwishMe"))), functions=(F.silu,),
               aliases=("swish",)),
    Activation("gelu", lambda z, slope: F.gelu(z), nn.GELU, ((_TORCH, "GELU"), (_TIMM[0], "GELU")),
               functions=(F.gelu,)),
    Activation("gelu_tanh", lambda z, slope: F.gelu(z, approximate="tanh"), GELUTanh,
               ((_TIMM[0], "GELUTanh"), (__name__, "GELUTanh"))),
    Activation("hardswish", lambda z, slope: F.hardswish(z), nn.Hardswish,
               ((_TORCH, "Hardswish"), *((m, n) for m in _TIMM for n in ("HardSwish", "HardSwishMe"))),
               functions=(F.hardswish,), aliases=("hard_swish",)),
    Activation("mish", lambda z, slope: F.mish(z), nn.Mish,
               ((_TORCH, "Mish"), *((m, n) for m in _TIMM for n in ("Mish", "MishMe"))), functions=(F.mish,)),
)
BY_NAME = {a.name: a for a in TABLE}
ACTIVATIONS = tuple(BY_NAME)
DERIVATIVE_FROM_OUTPUT = tuple(a.name for a in TABLE if a.derivative_from_output)
_BY_SPELLING = {spelling: a.name for a in TABLE for spelling in (a.name, *a.aliases)}
_BY_CLASS = {spelling: a.name for a in TABLE for spelling in a.module_classes}
FUNCTIONS = {function: a.name for a in TABLE for function in a.functions}
METHODS = {method: a.name for a in TABLE for method in a.methods}


def eager_activation(name: str, z: Tensor, negative_slope: float = 0.01) -> Tensor:
    """The eager expression the activation ``name`` stands for (the unfused path)."""
    return BY_NAME[name].eager(z, negative_slope)


def describe_activation(act: Any) -> tuple[str, float] | None:
    """``(activation, negative_slope)`` for an activation given as a name (fusedres's or timm's), an ``nn.Module``
    class or instance (torch's or timm's), or None (the identity), read now (a module's ``negative_slope`` or
    ``approximate``); None if fusedres does not fuse it."""
    if act is None:
        return "identity", 0.01
    if isinstance(act, str):
        name = _BY_SPELLING.get(act.lower())
        return None if name is None else (name, 0.01)
    kind = act if isinstance(act, type) else type(act)
    name = _BY_CLASS.get((kind.__module__, kind.__name__))
    if name is None:
        return None
    slope = float(getattr(act, "negative_slope", 0.01)) if not isinstance(act, type) else 0.01
    if name == "gelu" and getattr(act, "approximate", "none") == "tanh":
        name = "gelu_tanh"
    return name, slope


def activation_class(name: str) -> type | None:
    """The module class an activation name builds, as timm's BatchNormAct2d builds it: timm's own table
    (``timm.layers.get_act_layer``) when timm is installed, else the torch module of that name; None for a name
    neither knows."""
    try:
        from timm.layers import get_act_layer
    except ImportError:
        get_act_layer = None
    if get_act_layer is not None:
        try:
            return get_act_layer(name) or nn.Identity
        except KeyError:
            pass
    described = describe_activation(name)
    return None if described is None else BY_NAME[described[0]].module_class
