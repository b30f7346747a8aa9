"""Activation-memory saving (docs/design.md, "Memory saving"): the output of a fused batch-norm + activation site
without a residual is not kept for the backward by whatever consumes it; the backward recomputes it, bit for bit,
with the normalize kernel, from what the site keeps anyway (its input, the batch statistics, weight and bias).

How: while ``saving_memory()`` is active (``save_memory(model)`` enters it around every forward of the model;
``fusedres.convert(model, save_memory=True)`` does that), a fused site called in training with autograd recording
marks its output with a ``Recompute`` (``mark_recomputable``), and saved-tensor hooks replace every saving of that
very tensor (by identity, not address) by the ``Recompute``, which the backward unpacks into a recomputed output.
Nothing holds the output itself from forward to backward.

Exactness: the recomputation is the forward's own kernel launch on the same tensors, so its output is bitwise the
forward's; it never touches the running statistics. What autograd would catch is caught: the output changed in
place after a consumer saved it, or an input of the recomputation (the site's input, statistics, weight, bias)
changed in place before the backward, raise autograd's error; an output changed in place before a consumer saved it
is saved as it is (not recomputed). Under torch.compile, refused with a clear error.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["saving_memory", "save_memory", "saves_memory", "is_saving_memory"]

_state = threading.local()
_ATTRIBUTE = "_fusedres_recompute"


def is_saving_memory() -> bool:
    """Whether fused sites called now mark their outputs for recomputation."""
    return getattr(_state, "depth", 0) > 0


def _compiling() -> bool:
    """Whether torch.compile traces or runs this call: Dynamo is tracing it, or (after a graph break, as Python)
    Dynamo's frame callback is set."""
    if torch.compiler.is_compiling():
        return True
    try:
        from torch._C._dynamo import eval_frame
        return eval_frame.get_eval_frame_callback() not in (None, False)
    except (ImportError, AttributeError):  # (a torch without it: the public check alone)
        return False


def _refuse_compiling() -> None:
    if _compiling():
        raise RuntimeError("fusedres save_memory: not supported under torch.compile (its saved-tensor hooks and "
                           "recomputation run in eager PyTorch); use a model converted with save_memory=False, or "
                           "fusedres.save_memory(model, False), before torch.compile")


@contextlib.contextmanager
def saving_memory():
    """Inside: the outputs of fused batch-norm + activation sites without a residual, called in training with autograd
    recording, are recomputed in the backward instead of being kept by their consumers. Only the forward need run
    inside; the backward may run anywhere."""
    _refuse_compiling()
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _state.depth -= 1


class Recompute:
    """How to recompute one site's output: the forward's launch again, on the tensors it used. Holds those tensors
    (which the site's own backward keeps anyway) and their versions, and the output only weakly."""

    __slots__ = ("inputs", "versions", "eps", "activation", "negative_slope", "output", "output_version",
                 "output_counter", "cache", "__weakref__")

    def __init__(self, output: Tensor, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                 var: Tensor, eps: float, activation: str, negative_slope: float):
        self.inputs = (input, weight, bias, mean, var)
        self.versions = tuple(None if t is None else t._version for t in self.inputs)
        self.eps, self.activation, self.negative_slope = eps, activation, negative_slope
        self.output = weakref.ref(output)
        self.output_version = output._version
        self.output_counter = _version_counter(output)
        self.cache = None

    def recompute(self, saved_version: int) -> Tensor:
        if self.output_counter._version != saved_version:
            raise RuntimeError(f"one of the variables needed for gradient computation has been modified by an inplace "
                               f"operation: the output of a fused batch-norm site (fusedres save_memory recomputes "
                               f"it in the backward) is at version {self.output_counter._version}; expected version "
                               f"{saved_version} instead.")
        for name, t, version in zip(("input", "weight", "bias", "mean", "var"), self.inputs, self.versions):
            if t is not None and t._version != version:
                raise RuntimeError(f"one of the variables needed for gradient computation has been modified by an "
                                   f"inplace operation: the {name} of a fused batch-norm site, from which fusedres "
                                   f"save_memory recomputes its output in the backward, is at version "
                                   f"{t._version}; expected version {version} instead.")
        cached = None if self.cache is None else self.cache()
        if cached is not None:
            return cached
        from . import ops

        input, weight, bias, mean, var = self.inputs
        with torch.no_grad():
            result = ops.run_batch_norm_act(input, None, weight, bias, mean, var, True, self.eps, self.activation,
                                            self.negative_slope)
        self.cache = weakref.ref(result)
        return result


def _version_counter(t: Tensor) -> Tensor:
    """An empty tensor sharing ``t``'s version counter: it sees every in-place change of ``t`` (and of its views),
    also after ``t`` is gone, and holds none of its memory. (``detach`` shares the counter; assigning ``.data``
    swaps the storage and keeps the counter, without counting as a change.)"""
    counter = t.detach()
    counter.data = t.new_empty(0)
    return counter


def mark_recomputable(output: Tensor, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                      var: Tensor, eps: float, activation: str, negative_slope: float) -> None:
    """Mark a fused site's output (no residual, batch statistics ``mean``, ``var``) for recomputation, when memory
    is being saved and autograd records it."""
    if is_saving_memory() and torch.is_grad_enabled() and output.requires_grad:
        setattr(output, _ATTRIBUTE, Recompute(output, input.detach(), weight, bias, mean, var, eps, activation,
                                              negative_slope))


def _pack(t: Tensor):
    recompute = getattr(t, _ATTRIBUTE, None)
    if recompute is None or recompute.output() is not t or t._version != recompute.output_version:
        return t  # not a marked output, or changed in place since the site made it: saved as it is
    return recompute, t._version


def _unpack(packed):
    if type(packed) is tuple:
        recompute, version = packed
        return recompute.recompute(version)
    return packed


# --- The switch on a model -----------------------------------------------------------------------------------

def _enter(module, args):
    """Forward pre-hook of a model saving memory (``save_memory``)."""
    context = saving_memory()
    context.__enter__()
    _state.__dict__.setdefault("contexts", []).append(context)


def _exit(module, args, output):
    """Forward hook (also called when the forward raises) of a model saving memory."""
    contexts = _state.__dict__.get("contexts")
    if contexts:
        contexts.pop().__exit__(None, None, None)


# fusedres's own hooks: a site whose module carries them is not "hooked" (modules.own_hooks).
_enter._fusedres_internal = True
_exit._fusedres_internal = True


def refuse_under_compile(function: str) -> None:
    """Called by the fused ops' fake implementations (which only run while torch.compile or torch.export traces):
    a site saving memory cannot be compiled, and must not silently keep its output."""
    if is_saving_memory():
        raise RuntimeError(f"fusedres::{function}: save_memory is not supported under torch.compile or torch.export "
                           f"(its saved-tensor hooks and recomputation run in eager PyTorch); switch it off first: "
                           f"fusedres.save_memory(model, False), or convert with save_memory=False")


def save_memory(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch activation-memory saving on (or off) for every forward of ``model`` (a converted model, or any module
    holding fusedres's fused modules): its forward runs inside ``saving_memory()``. Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_memory: expected an nn.Module, got {type(model).__name__}")
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [key for key, hook in hooks.items() if hook is _enter or hook is _exit]:
            del hooks[key]
            model._forward_hooks_always_called.pop(key, None)
    if enabled:
        model.register_forward_pre_hook(_enter)
        model.register_forward_hook(_exit, always_call=True)
    return model


def saves_memory(model: nn.Module) -> bool:
    """Whether ``save_memory`` switched memory saving on for ``model``."""
    return any(hook is _enter for hook in model._forward_pre_hooks.values())
