"""Triton kernels and their launchers. Nothing here allocates outputs, knows autograd or picks a backend:
that is the op layer's (``fusedres/ops.py``).

``walk.py``: how a kernel walks a tensor, the launch constants and plumbing; ``tiles.py``: the ``@triton.jit``
pieces the batch-norm kernels are made of; ``batch_norm_forward.py``, ``batch_norm_backward.py``: those kernels;
``batch_norm.py``: their launchers; ``add_act.py``: the flat add + activation kernels and launchers;
``activations.py``: the activations' formulas and derivatives; ``_interpreter.py``: the interpreter made to
round as a GPU does."""
from . import add_act, batch_norm
from .activations import ACTIVATIONS, DERIVATIVE_FROM_OUTPUT
from .walk import INTERPRETING, forced_int64, poisoned_scratch, recorded_launches, recording_only

if INTERPRETING:  # bf16 results rounded as the GPU rounds them (_interpreter.py)
    from ._interpreter import round_bf16_to_nearest_even

    round_bf16_to_nearest_even()

__all__ = ["add_act", "batch_norm", "INTERPRETING", "forced_int64", "poisoned_scratch", "recorded_launches",
           "recording_only", "ACTIVATIONS", "DERIVATIVE_FROM_OUTPUT"]
