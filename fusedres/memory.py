"""Activation-memory saving (docs/design.md, "Memory saving"): the output of a fused batch-norm + activation site
without a residual is not kept for the backward by whatever consumes it; the backward recomputes it, bit for bit,
with the normalize kernel, from what the site keeps anyway (its input, the batch statistics, weight and bias).

How: while ``saving_memory()`` is active (``save_memory(model)`` enters it around every forward of the model;
``fusedres.convert(model, save_memory=True)`` does that), a fused site called in training with autograd recording
marks its output with a ``Recompute`` (``mark_recomputable``), and saved-tensor hooks replace every saving of that
very tensor (by identity, not address) by the ``Recompute``, which the backward unpacks into a recomputed output.
Nothing holds the output itself from forward to backward.

Exactness: the recomputation is the forward's own kernel launch on the same tensors (read from the site's autograd
node, so that a chain of sites recomputes in turn and nothing else holds them), so its output is bitwise the
forward's; it never touches the running statistics. Saved-tensor hooks turn off autograd's own version check of
what they unpack, so every tensor saved here is checked as autograd checks it: one changed in place between the
forward and the backward raises autograd's error (the output too: a version-counter alias sees its changes after it
is gone); an output changed in place before a consumer saved it is saved as it is. Inside another saved-tensor
mechanism (a checkpoint of the whole model, ``save_on_cpu``) the outer one decides what is kept: memory saving
stands aside. Under torch.compile, refused with a clear error.
"""
from __future__ import annotations

import contextlib
import threading
import weakref

import torch
from torch import Tensor, nn

__all__ = ["saving_memory", "save_memory", "saves_memory", "is_saving_memory"]

_state = threading.local()
_ATTRIBUTE = "_fusedres_recompute"


def is_saving_memory() -> bool:
    """Whether fused sites called now mark their outputs: our hooks pack what is saved now (inside a checkpointed
    segment the checkpoint's do, and the site's node is then the checkpoint's to unpack, once)."""
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return top is not None and top[0] is _pack


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
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        yield  # another mechanism's hooks (checkpoint, save_on_cpu) would be overridden by ours: they decide
        return
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        yield


class Recompute:
    """How to recompute one site's output: the forward's launch again, on the tensors the site's autograd node saved
    (its input, weight, bias and batch statistics; unpacked through these hooks, so each is checked, and an input
    that is itself a recomputed output is recomputed first). Holds the node (which the output holds anyway) and
    the output only weakly, with an alias of its version counter."""

    __slots__ = ("node", "output", "output_version", "output_counter", "cache", "cache_version", "__weakref__")

    def __init__(self, output: Tensor, node):
        self.node = node
        self.output = weakref.ref(output)
        self.output_version = output._version
        self.output_counter = _version_counter(output)
        self.cache = None
        self.cache_version = None

    def recompute(self, saved_version: int) -> Tensor:
        _check_version("the output of a fused batch-norm site (fusedres save_memory recomputes it in the backward)",
                       self.output_counter._version, saved_version)
        cached = None if self.cache is None else self.cache()
        if cached is not None and cached._version == self.cache_version:
            return cached  # (several consumers unpacking it at once)
        from . import ops

        node = self.node
        input, _, weight, bias, mean, var = node.saved_tensors
        with torch.no_grad():
            result = ops.run_batch_norm_act(input, None, weight, bias, mean, var, True, node.eps, node.activation,
                                            node.negative_slope)
        self.cache, self.cache_version = weakref.ref(result), result._version
        return result


def _check_version(what: str, version: int, saved_version: int) -> None:
    """Autograd's check of a saved tensor, which saved-tensor hooks turn off for what they unpack."""
    if version != saved_version:
        raise RuntimeError(f"one of the variables needed for gradient computation has been modified by an inplace "
                           f"operation: {what} is at version {version}; expected version {saved_version} instead. "
                           f"(fusedres save_memory checks the tensors it packs as autograd does.)")


def _version_counter(t: Tensor) -> Tensor:
    """An empty tensor sharing ``t``'s version counter: it sees every in-place change of ``t`` (and of its views),
    also after ``t`` is gone, and holds none of its memory. (``detach`` shares the counter; assigning ``.data``
    swaps the storage and keeps the counter, without counting as a change.)"""
    counter = t.detach()
    counter.data = t.new_empty(0)
    return counter


def mark_recomputable(output: Tensor) -> None:
    """Mark a fused site's output (no residual, batch statistics) for recomputation, when memory is being saved
    and autograd records it. Its autograd node must be the site's: ``batch_norm_act_setup_context``'s saved tensors
    (input, pre-activation source, weight, bias, mean, var) and ``eps``, ``activation``, ``negative_slope``."""
    if is_saving_memory() and torch.is_grad_enabled() and output.requires_grad and output.grad_fn is not None:
        setattr(output, _ATTRIBUTE, Recompute(output, output.grad_fn))


def _pack(t: Tensor):
    recompute = getattr(t, _ATTRIBUTE, None)
    if recompute is not None and recompute.output() is t and t._version == recompute.output_version:
        return recompute, t._version
    return t, t._version  # (not a marked output, or changed in place since the site made it: saved as it is)


def _unpack(packed):
    saved, version = packed
    if isinstance(saved, Recompute):
        return saved.recompute(version)
    _check_version(f"a {saved.dtype} tensor of shape {tuple(saved.shape)} saved for the backward", saved._version,
                   version)
    return saved


# --- The switch on a model -----------------------------------------------------------------------------------

def _enter(module, args):
    """Forward pre-hook of a model saving memory (``save_memory``)."""
    context = saving_memory()
    context.__enter__()
    _state.__dict__.setdefault("contexts", []).append((module, context))


def _exit(module, args, output):
    """Forward hook (also called when the forward raises) of a model saving memory: leaves this module's context
    (none if its pre-hook did not get to enter one)."""
    contexts = _state.__dict__.get("contexts")
    if contexts and contexts[-1][0] is module:
        contexts.pop()[1].__exit__(None, None, None)


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
        model.register_forward_pre_hook(_enter, prepend=True)
        model.register_forward_hook(_exit, always_call=True)
    return model


def saves_memory(model: nn.Module) -> bool:
    """Whether ``save_memory`` switched memory saving on for ``model``."""
    return any(hook is _enter for hook in model._forward_pre_hooks.values())
