"""``convert``, ``revert`` and ``conversion_report``: make an existing model run its batch-norm + ReLU and
batch-norm + add + ReLU sites on the fused ops, and back.

How a site is found: each module's own forward is traced with torch.fx (its submodules are leaves, except plain
``nn.Sequential``s, which are traced through), so blocks are recognised by what they compute, not by class
name. A site is an ``nn.BatchNorm2d`` (called once, held by one parent, no hooks) whose output goes only, through
``nn.Identity`` modules at most, to a ReLU, or to an add whose result goes only to a ReLU. Then:

- where every site of a module is a batch-norm followed by a ReLU *module* used only there, the two modules are
  swapped in place (BatchNormReLU2d, ReLUFusedAway): the module's class and forward stay as they are;
- otherwise the module's forward is rewritten from the traced graph, each site becoming one call of
  ``fusedres.modules.fused_site``, and the module's class becomes an importable subclass of its own
  (``fusedres.converted``): it stays an instance of its original class, and pickles.

A forward that cannot be traced, or that reads ``self.training`` or other run-time switches (tracing would
freeze them), is not rewritten; its sites are named in the report. The seed's eager blocks
(``fusedres.seed``) become fusedres's fused blocks. Parameters and buffers are the same objects, so the
state_dict is unchanged and, with ``inplace=True``, an optimizer built before conversion keeps working.
"""
from __future__ import annotations

import copy
import inspect
import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .blocks import FUSED_SEED_CLASSES
from .converted import ConvertedForward, fused_class
from .modules import (BATCH_NORM_ADD_RELU, BATCH_NORM_RELU, BatchNormReLU2d, ReLUFusedAway, fuse_relu_module,
                      fused_site)

__all__ = ["convert", "revert", "conversion_report"]

NOT_ANALYSED = "not_analysed"
_RELU_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.relu_}
_RELU_METHODS = {"relu", "relu_"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_RUNTIME_SWITCHES = re.compile(r"self\.training\b|grad_checkpointing|torch\.jit\.is_tracing|is_compiling")


def _refuse_wrappers(fn: str, model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise TypeError(f"{fn}: got a {type(model).__name__}-wrapped model; {fn} the model first, then wrap it: "
                        f"DistributedDataParallel(fusedres.{fn}(model))")


class _Tracer(fx.Tracer):
    """Traces one module's own forward: submodules are leaves, except plain Sequentials."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return type(module) is not nn.Sequential


@dataclass
class _Site:
    batch_norm: fx.Node
    relu: fx.Node
    add: fx.Node | None = None
    shortcut: fx.Node | None = None
    identities: list = field(default_factory=list)


def _is_relu(node: fx.Node, owner: nn.Module) -> bool:
    if node.op == "call_module":
        return type(owner.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1
    return node.op == "call_method" and node.target in _RELU_METHODS and len(node.args) == 1


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
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def _module_calls(graph: fx.Graph) -> dict[str, int]:
    """How many times the traced forward calls each submodule."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def _find_sites(owner: nn.Module, graph: fx.Graph, calls: dict[str, int], holders: dict) -> list[_Site]:
    sites = []
    for node in graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1 or node.kwargs or len(node.args) != 1:
            continue
        batch_norm = owner.get_submodule(node.target)
        if type(batch_norm) is not nn.BatchNorm2d or holders[id(batch_norm)] != 1 or _hooked(batch_norm):
            continue
        value, identities = node, []
        user = _sole_user(value)
        while user is not None and user.op == "call_module" and type(owner.get_submodule(user.target)) is nn.Identity:
            identities.append(user)
            value, user = user, _sole_user(user)
        if user is None:
            continue
        if _is_relu(user, owner):
            sites.append(_Site(node, user, identities=identities))
            continue
        shortcut = _add_operand(user, value)
        relu = _sole_user(user) if shortcut is not None else None
        if relu is not None and _is_relu(relu, owner):
            sites.append(_Site(node, relu, add=user, shortcut=shortcut, identities=identities))
    return _one_site_per_add(sites)


def _one_site_per_add(sites: list[_Site]) -> list[_Site]:
    """When both summands of an add come from batch-norms (a projection shortcut), fuse the first summand's:
    ``out += shortcut`` puts the residual branch first."""
    chosen: dict[fx.Node, _Site] = {}
    for site in sites:
        if site.relu not in chosen or _is_first_summand(site):
            chosen[site.relu] = site
    return list(chosen.values())


def _is_first_summand(site: _Site) -> bool:
    value = site.identities[-1] if site.identities else site.batch_norm
    return site.add is not None and site.add.args[0] is value


def _parent_and_name(qualified_name: str) -> tuple[str, str]:
    parent, _, name = qualified_name.rpartition(".")
    return parent, name


def _swappable(site: _Site, owner: nn.Module, calls: dict[str, int], holders: dict) -> bool:
    """A batch-norm followed by a ReLU module that is used only there, both held by the same parent."""
    if site.add is not None or site.relu.op != "call_module":
        return False
    relu = owner.get_submodule(site.relu.target)
    same_parent = _parent_and_name(site.relu.target)[0] == _parent_and_name(site.batch_norm.target)[0]
    return same_parent and calls[site.relu.target] == 1 and holders[id(relu)] == 1 and not _hooked(relu)


def _rewrite_forward(owner: nn.Module, graph: fx.Graph, sites: list[_Site]) -> str:
    """The source of owner's forward with each site replaced by one fused_site call."""
    for site in sites:
        with graph.inserting_before(site.relu):
            batch_norm = graph.get_attr(site.batch_norm.target)
            args = (batch_norm, site.batch_norm.args[0]) + ((site.shortcut,) if site.add is not None else ())
            fused = graph.call_function(fused_site, args)
        site.relu.replace_all_uses_with(fused)
        for node in [site.relu, site.add, *reversed(site.identities), site.batch_norm]:
            if node is not None:
                graph.erase_node(node)
    graph.lint()
    from torch.fx.graph_module import _format_import_block
    from torch.package import sys_importer

    code = graph.python_code(root_module="self")
    return _format_import_block(code.globals, sys_importer) + code.src


def _forward_is_rewritable(module: nn.Module) -> str | None:
    """None if the forward may be replaced by its trace, else why not."""
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return "its forward's source is unavailable"
    switch = _RUNTIME_SWITCHES.search(source)
    return None if switch is None else f"its forward reads {switch.group(0)!r}, which a trace would freeze"


def _owns_batch_norm(module: nn.Module) -> bool:
    for child in module.children():
        if type(child) is nn.BatchNorm2d or (type(child) is nn.Sequential and _owns_batch_norm(child)):
            return True
    return False


def _convert_module(name: str, module: nn.Module, holders: dict, not_analysed: list) -> None:
    label = name or "<model>"
    try:
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
    reason = None if len(swappable) == len(sites) else _forward_is_rewritable(module)
    if len(swappable) == len(sites) or reason is not None:
        for site in swappable:
            parent = module.get_submodule(_parent_and_name(site.batch_norm.target)[0])
            fuse_relu_module(parent, _parent_and_name(site.batch_norm.target)[1],
                             _parent_and_name(site.relu.target)[1])
        for site in sites:
            if site not in swappable:
                not_analysed.append((name, f"{label}.{site.batch_norm.target} ({type(module).__name__}): "
                                           f"left unfused: {reason}"))
        return
    for site in sites:
        BatchNormReLU2d.fuse(module.get_submodule(site.batch_norm.target),
                             BATCH_NORM_RELU if site.add is None else BATCH_NORM_ADD_RELU)
    source = _rewrite_forward(module, graph, sites)
    module.__class__ = fused_class(type(module))
    module.set_forward_source(source)


def _is_candidate(module: nn.Module) -> bool:
    """Modules whose own forward may hold sites: containers and user/library blocks, not torch.nn leaves or
    what fusedres made."""
    kind = type(module)
    if kind is nn.Sequential:
        return True
    if kind.__module__.startswith(("torch.nn.", "fusedres.")) or isinstance(module, ConvertedForward):
        return False
    return not isinstance(module, (nn.ModuleList, nn.ModuleDict))


def convert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Run every batch-norm + ReLU and batch-norm + add + ReLU site of ``model`` on fusedres's fused ops.

    ``inplace=False`` converts a deep copy and leaves ``model`` untouched; ``inplace=True`` converts ``model``
    itself, keeping its Parameter and buffer objects. Mode, device, dtype, memory format, ``requires_grad`` and
    the state_dict are kept. Returns the converted model; ``conversion_report`` tells what was fused and what
    could not be analysed. Convert before wrapping in DistributedDataParallel."""
    _refuse_wrappers("convert", model)
    if not inplace:
        model = copy.deepcopy(model)
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
        elif _is_candidate(module):
            _convert_module(name, module, holders, not_analysed)
    order = {name: index for index, (name, _) in enumerate(modules)}
    model.__dict__["_fusedres_not_analysed"] = [text for name, text in sorted(not_analysed,
                                                                             key=lambda e: order[e[0]])]
    return model


def revert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Undo ``convert`` (and fusedres's fused seed blocks): plain torch modules, the same state_dict, the same
    outputs. ``inplace`` as in ``convert``."""
    _refuse_wrappers("revert", model)
    if not inplace:
        model = copy.deepcopy(model)
    for module in list(model.modules()):
        unfused = getattr(type(module), "_fusedres_unfused_class", None)
        if unfused is not None:
            module.__dict__.pop("_fusedres_forward_source", None)
            module.__dict__.pop("_fusedres_forward", None)
            module.__class__ = unfused
        if isinstance(module, BatchNormReLU2d) and "fused_pattern" in module.__dict__:
            BatchNormReLU2d.unfuse(module)
        for child_name, child in list(module._modules.items()):
            if isinstance(child, ReLUFusedAway):
                module._modules[child_name] = child.__dict__["relu"]
    model.__dict__.pop("_fusedres_not_analysed", None)
    return model


def conversion_report(model: nn.Module) -> dict[str, list[str]]:
    """Pattern -> qualified names of the fused sites (their batch-norm modules), and ``"not_analysed"`` -> what
    ``convert`` had to leave, and why."""
    report: dict[str, list[str]] = {BATCH_NORM_RELU: [], BATCH_NORM_ADD_RELU: []}
    for name, module in model.named_modules():
        if isinstance(module, BatchNormReLU2d):
            report.setdefault(module.fused_pattern, []).append(name)
    report[NOT_ANALYSED] = list(model.__dict__.get("_fusedres_not_analysed", []))
    return report
