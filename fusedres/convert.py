"""``convert``, ``revert`` and ``conversion_report``: make an existing model run its batch-norm + activation and
batch-norm + add (+ activation) sites on fusedres's fused ops, and back.

How a site is found: each module's own forward is traced with torch.fx (its submodules are leaves, except plain
``nn.Sequential``s and Sequential subclasses without a forward of their own, such as torchvision's
``Conv2dNormActivation``, which are traced through), so blocks are recognised by what they compute, not by class
name. A site is a batch-norm (``nn.BatchNorm1d`` / ``2d`` / ``3d``, ``nn.SyncBatchNorm``, torchvision's
``FrozenBatchNorm2d``; called once, held by one parent, no hooks) whose output goes only, through
``nn.Identity`` modules at most, to an activation fusedres fuses (a module or a function:
``fusedres.activations``' table), or to an add whose result goes only to such an activation, or to an
add with no activation after it at all (the identity: MobileNetV2's linear bottleneck). timm's
``BatchNormAct2d`` and ``FrozenBatchNormAct2d`` (batch-norm and activation in one module) become fusedres's
``BatchNormAct2d`` / ``FrozenBatchNormAct2d`` in place, and one with the identity for activation can then take the
add that follows it. Then:

- where every site of a module is a batch-norm followed by an activation *module* used only there, the two
  modules are swapped in place (a BatchNormAct, ActivationFusedAway): the module's class and forward stay as
  they are;
- otherwise the module's forward is rewritten from the traced graph, each site becoming one call of
  ``fusedres.converted.fused_site``, and the module's class becomes an importable subclass of its own
  (``fusedres.converted``): it stays an instance of its original class, and pickles.

A forward that cannot be traced, or that reads ``self.training`` or other run-time switches (in its own source or
in a method it calls: tracing would freeze them), is not rewritten; its sites are named in the report. Every
other attribute of the block the trace read (a flag, a rate, an optional submodule that was None) is recorded,
and the converted forward falls back to the original one when it differs at call time
(``fusedres.converted.ConvertedForward``). Anything between the batch-norm and the add that is not an identity
(stochastic depth, drop-path with a non-zero rate, squeeze-excitation) makes the site no site. What each site
checks at call time (a replaced or hooked module, the residual's shape) is ``fusedres.converted``'. The seed's
eager blocks (``fusedres.seed``) become fusedres's fused blocks. Parameters and buffers are the same objects, so
the state_dict is unchanged and, with ``inplace=True``, an optimizer built before conversion keeps working.
"""
from __future__ import annotations

import contextlib
import copy
import enum
import importlib
import inspect
import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from .blocks import FUSED_SEED_CLASSES
from .activations import FUNCTIONS, METHODS, describe_activation
from .converted import ActivationFusedAway, ConvertedForward, fuse_activation_module, fused_class, fused_site
from .memory import save_memory as switch_memory_saving
from .modules import (BATCH_NORM_ACT, BATCH_NORM_ADD_ACT, BATCH_NORM_ADD_RELU, BATCH_NORM_RELU, BatchNormAct,
                      SyncBatchNormAct2d, class_key, fused_class_for, is_frozen_batch_norm, own_hooks, site_pattern)

__all__ = ["convert", "revert", "conversion_report", "convert_sync_batchnorm"]

NOT_ANALYSED = "not_analysed"
_TIMM_BATCH_NORM_ACT = ("timm.layers.norm_act", "BatchNormAct2d")
_TIMM_SYNC_BATCH_NORM_ACT = ("timm.layers.norm_act", "SyncBatchNormAct")
_TIMM_FROZEN_BATCH_NORM_ACT = ("timm.layers.norm_act", "FrozenBatchNormAct2d")
# What a site's batch-norm may be before fusion: a batch-norm of any rank, synchronized or frozen (torchvision's,
# which timm uses too); and timm's batch-norms with an activation of their own, which become fused in place first.
_PLAIN_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_PLAIN_FROZEN_BATCH_NORMS = {("torchvision.ops.misc", "FrozenBatchNorm2d")}
_TIMM_NORM_ACTS = {_TIMM_BATCH_NORM_ACT, _TIMM_SYNC_BATCH_NORM_ACT, _TIMM_FROZEN_BATCH_NORM_ACT}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_RUNTIME_SWITCHES = re.compile(r"self\.training\b|grad_checkpointing|torch\.jit\.is_tracing|is_compiling")


def _refuse_wrappers(fn: str, model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise TypeError(f"{fn}: got a {type(model).__name__}-wrapped model; {fn} the model first, then wrap it: "
                        f"DistributedDataParallel(fusedres.{fn}(model))")


def _traced_through(module: nn.Module) -> bool:
    """Sequentials without a forward of their own: their parents' traces see inside them."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


class _Tracer(fx.Tracer):
    """Traces one module's own forward: submodules are leaves, except Sequentials without a forward of their own."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return not _traced_through(module)


# nn.Module's own instance attributes (hooks, registries, flags), but the training flag: reads of these during a
# trace are the machinery's, not the forward's.
_MODULE_INTERNALS = frozenset(vars(nn.Module())) - {"training"}
_PLAIN_VALUES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size, enum.Enum)


@dataclass
class _Reads:
    """What a trace read from the traced module's own attributes: ``frozen``, name -> the value the trace used
    (plain values, containers of them, tensors that are not parameters or buffers, optional submodules that were
    None); ``methods``, the module's own methods it called."""

    frozen: dict = field(default_factory=dict)
    methods: dict = field(default_factory=dict)

    def note(self, module: nn.Module, name: str, value) -> None:
        if name.startswith("__") or name in _MODULE_INTERNALS or name in self.frozen:
            return
        registered = name in module._modules or name in module._parameters or name in module._buffers
        if registered:
            if value is None:
                self.frozen[name] = None
        elif isinstance(value, torch.Tensor):
            self.frozen[name] = value  # a constant of the trace, compared by identity
        elif inspect.ismethod(value):
            function = value.__func__
            if not getattr(function, "__module__", "").startswith("torch."):
                self.methods[name] = function
        elif isinstance(value, _PLAIN_VALUES):
            self.frozen[name] = value
        elif _plain_container(value):  # a snapshot: the list or dict itself may be changed in place later
            self.frozen[name] = copy.deepcopy(value)


def _plain_container(value) -> bool:
    if isinstance(value, (tuple, list, set, frozenset)):
        return all(isinstance(v, _PLAIN_VALUES) or _plain_container(v) for v in value)
    if isinstance(value, dict):
        return all(_plain_container((k, v)) for k, v in value.items())
    return False


@contextlib.contextmanager
def _recording_reads(module: nn.Module, reads: _Reads):
    """While inside, ``module`` notes in ``reads`` every attribute read from it (its class swapped for a
    subclass that records)."""
    original = type(module)

    def __getattribute__(self, name):
        value = original.__getattribute__(self, name)
        reads.note(self, name, value)
        return value

    def __getattr__(self, name):
        value = original.__getattr__(self, name)
        reads.note(self, name, value)
        return value

    module.__class__ = type(original.__name__, (original,), {"__getattribute__": __getattribute__,
                                                             "__getattr__": __getattr__,
                                                             "__module__": original.__module__})
    try:
        yield reads
    finally:
        module.__class__ = original


def _contents(value):
    """The contents of a plain container (a list, dict or set a trace may change in place), in order, keys and
    values alike; None for anything else."""
    if type(value) in (list, set):
        return list(value)
    if type(value) is dict:
        return [entry for item in value.items() for entry in item]
    return None


def _same_contents(before: list, value) -> bool:
    """Whether the container holds the very objects it held (an unchanged container iterates in the same order)."""
    now = _contents(value)
    return len(now) == len(before) and all(a is b for a, b in zip(now, before))


def _restore_contents(value, before: list) -> None:
    value.clear()
    if type(value) is list:
        value.extend(before)
    elif type(value) is set:
        value.update(before)
    else:
        value.update(zip(before[::2], before[1::2]))


@contextlib.contextmanager
def _state_kept(module: nn.Module):
    """While inside, a trace may set attributes of ``module`` (and of the Sequentials it traces through), or change
    a list, dict or set it holds: a forward that caches what it computes on its first call (torchvision's
    MultiScaleRoIAlign keeps its scales) would keep values made of Proxies. Afterwards each module's attributes and
    their containers' contents are what they were; the list yielded then holds the names of the attributes the
    trace set or changed (a forward that does so cannot be replaced by its trace, which records neither)."""
    traced = [module] + [m for m in module.modules() if m is not module and _traced_through(m)]
    registries = ("_parameters", "_buffers", "_modules")
    saved = [(m, dict(m.__dict__), {key: dict(m.__dict__[key]) for key in registries},
              {name: (value, _contents(value)) for name, value in m.__dict__.items()
               if name not in registries and _contents(value) is not None})
             for m in traced]
    changed: list[str] = []
    try:
        yield changed
    finally:
        for m, attributes, entries, containers in saved:
            now = {**m.__dict__, **{name: value for key in registries for name, value in m.__dict__[key].items()}}
            before = {**attributes, **{name: value for key in registries for name, value in entries[key].items()}}
            changed += [name for name, value in now.items() if name not in before or before[name] is not value]
            for name, (container, contents) in containers.items():
                if not _same_contents(contents, container):
                    changed.append(name)
                    _restore_contents(container, contents)
            m.__dict__.clear()
            m.__dict__.update(attributes)
            for key in registries:
                m.__dict__[key].clear()
                m.__dict__[key].update(entries[key])


@dataclass
class _Site:
    batch_norm: fx.Node
    end: fx.Node                  # the node the fused call replaces: the activation, or the add without one
    activation: str
    negative_slope: float
    add: fx.Node | None = None
    shortcut: fx.Node | None = None
    identities: list = field(default_factory=list)
    act: fx.Node | None = None    # the activation node, if any


def _activation_of(node: fx.Node, owner: nn.Module) -> tuple[str, float] | None:
    """(activation, negative_slope) if ``node`` applies an activation fusedres fuses to its only argument."""
    if node.op == "call_module":
        return describe_activation(owner.get_submodule(node.target))
    if node.op == "call_method":
        return (METHODS[node.target], 0.01) if node.target in METHODS and \
            len(node.args) == 1 and not node.kwargs else None
    if node.op != "call_function" or node.target not in FUNCTIONS:
        return None
    name = FUNCTIONS[node.target]
    extra = dict(node.kwargs)
    extra.pop("inplace", None)
    if name == "leaky_relu":
        slope = node.args[1] if len(node.args) > 1 else extra.pop("negative_slope", 0.01)
        return (name, float(slope)) if not extra and len(node.args) <= 3 and isinstance(slope, (int, float)) \
            else None
    if name == "gelu":
        approximate = node.args[1] if len(node.args) > 1 else extra.pop("approximate", "none")
        name = {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
        return (name, 0.01) if name is not None and not extra else None
    return (name, 0.01) if not extra and len(node.args) <= (2 if name != "relu" else 1) else None


def _add_operand(node: fx.Node, value: fx.Node):
    """The other summand if ``node`` is ``value + other`` (in any spelling, no alpha), else None."""
    is_add = ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
              or (node.op == "call_method" and node.target in _ADD_METHODS))
    if not is_add or node.kwargs or len(node.args) != 2:
        return None
    first, second = node.args
    other = second if first is value else first if second is value else None
    return other if isinstance(other, fx.Node) and other is not value else None


def _sole_user(node: fx.Node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _hooked(module: nn.Module) -> bool:
    return own_hooks(module)


def _module_calls(graph: fx.Graph) -> dict[str, int]:
    """How many times the traced forward calls each submodule."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def _is_plain_batch_norm(module: nn.Module) -> bool:
    """A batch-norm without an activation of its own, not fused yet."""
    return type(module) in _PLAIN_BATCH_NORMS or class_key(type(module)) in _PLAIN_FROZEN_BATCH_NORMS


def _is_site_batch_norm(module: nn.Module) -> bool:
    """A plain batch-norm, or one convert made from timm's BatchNormAct2d (or FrozenBatchNormAct2d) with the
    identity for activation and no residual yet: it can take the add that follows it, and the activation after
    that."""
    if _is_plain_batch_norm(module):
        return True
    original = module.__dict__.get("_fusedres_original_class")
    return (isinstance(module, BatchNormAct) and original is not None and _is_timm_batch_norm_act_class(original)
            and module.activation == "identity" and module.fused_pattern == BATCH_NORM_ACT)


def _find_sites(owner: nn.Module, graph: fx.Graph, calls: dict[str, int], holders: dict) -> list[_Site]:
    sites = []
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1 or node.kwargs or len(node.args) != 1:
            continue
        batch_norm = owner.get_submodule(node.target)
        if not _is_site_batch_norm(batch_norm) or holders[id(batch_norm)] != 1 or _hooked(batch_norm):
            continue
        value, identities = node, []
        user = _sole_user(value)
        while user is not None and user.op == "call_module" and type(owner.get_submodule(user.target)) is nn.Identity:
            identities.append(user)
            value, user = user, _sole_user(user)
        if user is None:
            continue
        activation = _activation_of(user, owner)
        if activation is not None and _is_plain_batch_norm(batch_norm):
            sites.append(_Site(node, user, *activation, identities=identities, act=user))
            continue
        shortcut = _add_operand(user, value)
        if shortcut is None:
            continue
        after = _sole_user(user)
        activation = _activation_of(after, owner) if after is not None else None
        if activation is not None:
            sites.append(_Site(node, after, *activation, add=user, shortcut=shortcut, identities=identities,
                               act=after))
        else:  # the add alone: the identity
            sites.append(_Site(node, user, "identity", 0.01, add=user, shortcut=shortcut, identities=identities))
    return _one_site_per_add(sites)


def _one_site_per_add(sites: list[_Site]) -> list[_Site]:
    """When both summands of an add come from batch-norms (a projection shortcut), fuse the first summand's:
    ``out += shortcut`` puts the residual branch first."""
    chosen: dict[fx.Node, _Site] = {}
    for site in sites:
        if site.add is None or site.add not in chosen or _is_first_summand(site):
            chosen[site.add if site.add is not None else site.end] = site
    return list(chosen.values())


def _is_first_summand(site: _Site) -> bool:
    value = site.identities[-1] if site.identities else site.batch_norm
    return site.add is not None and site.add.args[0] is value


def _parent_and_name(qualified_name: str) -> tuple[str, str]:
    parent, _, name = qualified_name.rpartition(".")
    return parent, name


def _swappable(site: _Site, owner: nn.Module, calls: dict[str, int], holders: dict) -> bool:
    """A batch-norm followed by an activation module that is used only there, both held by the same parent."""
    if site.add is not None or site.act is None or site.act.op != "call_module":
        return False
    activation = owner.get_submodule(site.act.target)
    same_parent = _parent_and_name(site.act.target)[0] == _parent_and_name(site.batch_norm.target)[0]
    return same_parent and calls[site.act.target] == 1 and holders[id(activation)] == 1 and not _hooked(activation)


def _rewrite_forward(owner: nn.Module, graph: fx.Graph, sites: list[_Site]) -> str:
    """The source of owner's forward with each site replaced by one fused_site call (an activation module is
    passed to it, looked up at call time, so that a replaced or hooked one is seen)."""
    replaced: dict[fx.Node, fx.Node] = {}  # a site's end -> its fused call (the input or residual of a later site)
    for site in sites:
        with graph.inserting_before(site.end):
            batch_norm = graph.get_attr(site.batch_norm.target)
            shortcut = replaced.get(site.shortcut, site.shortcut) if site.add is not None else None
            args = (batch_norm, replaced.get(site.batch_norm.args[0], site.batch_norm.args[0]), shortcut)
            kwargs = dict(activation=site.activation, negative_slope=site.negative_slope)
            if site.act is not None and site.act.op == "call_module":
                kwargs["activation_module"] = graph.get_attr(site.act.target)
            fused = graph.call_function(fused_site, args, kwargs)
        site.end.replace_all_uses_with(fused)
        replaced[site.end] = fused
        for node in dict.fromkeys([site.end, site.act, site.add, *reversed(site.identities), site.batch_norm]):
            if node is not None:
                graph.erase_node(node)
    graph.lint()
    from torch.fx.graph_module import _format_import_block
    from torch.package import sys_importer

    code = graph.python_code(root_module="self")
    return _format_import_block(code.globals, sys_importer) + code.src


def _forward_is_rewritable(module: nn.Module, reads: _Reads, set_by_trace: list[str]) -> str | None:
    """None if the forward may be replaced by its trace, else why not: a run-time switch read by the forward or a
    method of the module it called (tracing would freeze it), in its source or during the trace; an attribute it
    sets (a trace records no attribute writes)."""
    if set_by_trace:
        return f"it sets self.{set_by_trace[0]} (a cache, a counter), which its trace would not"
    if "training" in reads.frozen:
        return "it reads self.training (in its forward or a method it calls), which a trace would freeze"
    for where, function in (("its forward", type(module).forward), *((f"its method {name}", method)
                                                                    for name, method in reads.methods.items())):
        try:
            source = inspect.getsource(function)
        except (OSError, TypeError):
            return f"the source of {where} is unavailable"
        switch = _RUNTIME_SWITCHES.search(source)
        if switch is not None:
            return f"{where} reads {switch.group(0)!r}, which a trace would freeze"
    return None


def _owns_batch_norm(module: nn.Module) -> bool:
    for child in module.children():
        if _is_site_batch_norm(child) or (_traced_through(child) and _owns_batch_norm(child)):
            return True
    return False


def _convert_module(name: str, module: nn.Module, holders: dict, not_analysed: list) -> None:
    label = name or "<model>"
    reads = _Reads()
    try:
        with _state_kept(module) as set_by_trace, _recording_reads(module, reads):
            graph = _Tracer().trace(module)
    except Exception as error:  # any reason a forward cannot be traced
        if _owns_batch_norm(module):
            not_analysed.append((name, f"{label} ({type(module).__name__}): not traceable: "
                                       f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"))
        return
    calls = _module_calls(graph)
    sites = _find_sites(module, graph, calls, holders)
    if not sites:
        return
    swappable = [s for s in sites if _swappable(s, module, calls, holders)]
    reason = None if len(swappable) == len(sites) else _forward_is_rewritable(module, reads, set_by_trace)
    if len(swappable) == len(sites) or reason is not None:
        for site in swappable:
            parent = module.get_submodule(_parent_and_name(site.batch_norm.target)[0])
            fuse_activation_module(parent, _parent_and_name(site.batch_norm.target)[1],
                                   _parent_and_name(site.act.target)[1])
        for site in sites:
            if site not in swappable:
                not_analysed.append((name, f"{label}.{site.batch_norm.target} ({type(module).__name__}): "
                                           f"left unfused: {reason}"))
        return
    for site in sites:
        batch_norm = module.get_submodule(site.batch_norm.target)
        fused_class_for(batch_norm, site.activation).fuse(batch_norm, site.activation, site.negative_slope,
                                                          with_residual=site.add is not None)
    module.__dict__["_fusedres_site_batch_norms"] = [site.batch_norm.target for site in sites]
    source = _rewrite_forward(module, graph, sites)
    module.__class__ = fused_class(type(module))
    module.__dict__["_fusedres_frozen"] = reads.frozen
    module.set_forward_source(source)


def _is_timm_batch_norm_act_class(kind: type) -> bool:
    """timm's batch-norms with an activation (and a drop layer) of their own: trainable, synchronized or frozen."""
    return class_key(kind) in _TIMM_NORM_ACTS


def _is_timm_batch_norm_act(module: nn.Module) -> bool:
    return _is_timm_batch_norm_act_class(type(module))


def _is_trainable_timm_batch_norm_act(module: nn.Module) -> bool:
    return class_key(type(module)) in (_TIMM_BATCH_NORM_ACT, _TIMM_SYNC_BATCH_NORM_ACT)


def _timm_unfusable_reason(module: nn.Module) -> str | None:
    """Why timm's BatchNormAct2d ``module`` cannot become fusedres's, or None: its drop must be an identity and
    its activation one fusedres fuses."""
    if describe_activation(module._modules.get("act")) is None:
        return f"its activation {type(module._modules.get('act')).__name__} is not one fusedres fuses"
    if not isinstance(module._modules.get("drop"), nn.Identity) or _hooked(module):
        return "a drop layer or a hook sits inside it"
    return None


def _convert_timm_batch_norm_act(name: str, module: nn.Module, not_analysed: list) -> None:
    """timm's BatchNormAct2d (FrozenBatchNormAct2d) becomes fusedres's in place (same state_dict, its act and drop
    kept), when it can."""
    why = _timm_unfusable_reason(module)
    if why is not None:
        not_analysed.append((name, f"{name} ({type(module).__name__}): left unfused: {why}"))
        return
    activation, negative_slope = describe_activation(module._modules.get("act"))
    fused_class_for(module, activation).fuse(module, activation, negative_slope)


def _is_candidate(module: nn.Module) -> bool:
    """Modules whose own forward may hold sites: containers and user/library blocks, not torch.nn leaves or
    what fusedres made."""
    kind = type(module)
    if kind is nn.Sequential:
        return True
    if kind.__module__.startswith(("torch.nn.", "fusedres.")) or isinstance(module, ConvertedForward):
        return False
    # containers without a forward of their own (nn.ModuleList, nn.ModuleDict) have nothing to trace; subclasses
    # with one do (torchvision's IntermediateLayerGetter, a ModuleDict, holds detection backbones' stems)
    return getattr(kind.forward, "__name__", "") != "_forward_unimplemented"


def convert(model: nn.Module, *, inplace: bool = False, save_memory: bool = False) -> nn.Module:
    """Run every batch-norm + activation and batch-norm + add (+ activation) site of ``model`` on fusedres's fused
    ops.

    ``inplace=False`` converts a deep copy and leaves ``model`` untouched; ``inplace=True`` converts ``model``
    itself, keeping its Parameter and buffer objects. Mode, device, dtype, memory format, ``requires_grad`` and
    the state_dict are kept. ``save_memory=True``: in training, the outputs of the sites without a residual are
    recomputed in the backward instead of being kept (``fusedres.memory``; ``fusedres.save_memory(model, enabled)``
    switches it later). Returns the converted model; ``conversion_report`` tells what was fused and what could not
    be analysed. Convert before wrapping in DistributedDataParallel."""
    _refuse_wrappers("convert", model)
    if not inplace:
        model = _copy(model)
    holders: dict[int, int] = {}
    for _, parent in model.named_modules(remove_duplicate=False):
        for child in parent.children():
            holders[id(child)] = holders.get(id(child), 0) + 1
    not_analysed: list[tuple[str, str]] = []  # (module name, what and why)
    modules = list(model.named_modules())
    for name, module in reversed(modules):  # children before their parents
        fused_seed_class = FUSED_SEED_CLASSES.get(type(module))
        if fused_seed_class is not None:
            fused_seed_class.fuse(module)
        elif _is_timm_batch_norm_act(module):
            _convert_timm_batch_norm_act(name, module, not_analysed)
        elif _is_candidate(module):
            _convert_module(name, module, holders, not_analysed)
    order = {name: index for index, (name, _) in enumerate(modules)}
    model.__dict__["_fusedres_not_analysed"] = [text for name, text in sorted(not_analysed,
                                                                             key=lambda e: order[e[0]])]
    if save_memory:
        switch_memory_saving(model, True)
    return model


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy that shares the synchronized batch-norms' process groups (communicators are not copied)."""
    groups = {id(group): group for module in model.modules()
              if (group := module.__dict__.get("process_group")) is not None}
    copied = copy.deepcopy(model, memo=dict(groups))
    # Each module's mode as it was: some deep copies rebuild modules through __init__ (torch.fx's GraphModule,
    # torchvision's feature extractors), which leaves them training.
    modes = {name: module.training for name, module in model.named_modules()}
    for name, module in copied.named_modules():
        if name in modes:
            module.training = modes[name]
    return copied


def revert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Undo ``convert`` (and fusedres's fused seed blocks): plain torch modules, the same state_dict, the same
    outputs. ``inplace`` as in ``convert``."""
    _refuse_wrappers("revert", model)
    if not inplace:
        model = _copy(model)
    for module in list(model.modules()):
        unfused = getattr(type(module), "_fusedres_unfused_class", None)
        if unfused is not None:
            for attribute in ("_fusedres_forward_source", "_fusedres_forward", "_fusedres_frozen",
                              "_fusedres_site_batch_norms"):
                module.__dict__.pop(attribute, None)
            module.__class__ = unfused
        if isinstance(module, BatchNormAct) and "_fusedres_original_class" in module.__dict__:
            BatchNormAct.unfuse(module)
        for child_name, child in list(module._modules.items()):
            if isinstance(child, ActivationFusedAway):
                module._modules[child_name] = child.__dict__["activation_module"]
    model.__dict__.pop("_fusedres_not_analysed", None)
    switch_memory_saving(model, False)
    return model


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """fusedres's counterpart of ``nn.SyncBatchNorm.convert_sync_batchnorm``: every fused batch-norm (and timm's
    BatchNormAct2d), of any rank, becomes a ``SyncBatchNormAct2d`` in place, its activation and residual site kept;
    so does every plain ``nn.BatchNorm1d`` / ``2d`` / ``3d``, with the identity for activation: synchronized as an
    nn.SyncBatchNorm would be, and fused, and unlike an nn.SyncBatchNorm it also runs in a CPU module under
    DistributedDataParallel. Frozen batch-norms (fused or not) are left as they are: they have no batch statistics
    to synchronize. Other batch-norms (nn.SyncBatchNorm, lazy ones) become nn.SyncBatchNorm as torch's converter
    makes them. Returns the converted module (``module`` itself unless it is such a batch-norm); ``revert`` gives
    back the fused ones' original classes. A timm BatchNormAct2d that fusedres cannot fuse is refused before
    anything changes (torch's converter would drop its activation)."""
    _refuse_wrappers("convert_sync_batchnorm", module)
    for name, child in module.named_modules():
        why = _timm_unfusable_reason(child) if _is_trainable_timm_batch_norm_act(child) else None
        if why is not None:
            raise TypeError(f"convert_sync_batchnorm: expected timm BatchNormAct2d modules fusedres can fuse, got "
                            f"{name or '<model>'}, where {why}; synchronize that model with timm's "
                            f"convert_sync_batchnorm instead")
    return _synchronize(module, process_group)


def _synchronized_original(module: nn.Module) -> type:
    """The class ``revert`` should give back for a batch-norm that convert_sync_batchnorm synchronizes: what
    torch's (or timm's) converter would have made of it."""
    original = module.__dict__.get("_fusedres_original_class", type(module))
    if (original.__module__, original.__name__) == _TIMM_BATCH_NORM_ACT:
        return getattr(importlib.import_module(_TIMM_SYNC_BATCH_NORM_ACT[0]), _TIMM_SYNC_BATCH_NORM_ACT[1])
    return nn.SyncBatchNorm if original in _PLAIN_BATCH_NORMS else original


def _synchronize(module: nn.Module, process_group) -> nn.Module:
    """``module`` (or what replaces it) with its batch-norms synchronized over ``process_group``."""
    if _is_trainable_timm_batch_norm_act(module):
        _convert_timm_batch_norm_act("", module, [])
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        SyncBatchNormAct2d.fuse(module, "identity", original=nn.SyncBatchNorm)
    elif isinstance(module, BatchNormAct) and not isinstance(module, SyncBatchNormAct2d) and \
            not is_frozen_batch_norm(module):
        stored = module.__dict__.get("_fusedres_activation", module._fusedres_activation)
        SyncBatchNormAct2d.fuse(module, *stored, original=_synchronized_original(module),
                                with_residual=module.fused_pattern in (BATCH_NORM_ADD_RELU, BATCH_NORM_ADD_ACT))
    if isinstance(module, SyncBatchNormAct2d):
        module.__dict__["process_group"] = process_group
        return module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for name, child in module._modules.items():
        if child is not None:
            module._modules[name] = _synchronize(child, process_group)
    return module


def conversion_report(model: nn.Module) -> dict[str, list[str]]:
    """Pattern -> qualified names of the fused sites (their batch-norm modules): ``batch_norm_relu``,
    ``batch_norm_add_relu``, and for every other activation (the identity included) ``batch_norm_act`` and
    ``batch_norm_add_act``; ``"not_analysed"`` -> what ``convert`` had to leave, and why."""
    report: dict[str, list[str]] = {BATCH_NORM_RELU: [], BATCH_NORM_ADD_RELU: [], BATCH_NORM_ACT: [],
                                    BATCH_NORM_ADD_ACT: []}
    unfused = []
    for name, module in model.named_modules():
        if not isinstance(module, BatchNormAct):
            continue
        pattern = module.fused_pattern
        if pattern in (BATCH_NORM_RELU, BATCH_NORM_ACT) and ("act" in module._modules
                                                             or "_fusedres_partner" in module.__dict__):
            # what it applies on its own, read now (its act module, or the activation module fused into it)
            if module.own_activation() is None or ("_fusedres_partner" in module.__dict__
                                                   and not module.fuses_partner()):
                unfused.append(f"{name or '<model>'}: its activation runs unfused now (an activation fusedres does "
                               f"not fuse, a replaced activation module, or a hook)")
                continue
            pattern = site_pattern(module.activation, False)
        report.setdefault(pattern, []).append(name)
    report[NOT_ANALYSED] = list(model.__dict__.get("_fusedres_not_analysed", [])) + unfused
    return report
