"""Triton kernels and their launchers. Nothing here allocates outputs, knows autograd or picks a backend:
that is the op layer's (``fusedres/ops.py``)."""
from . import add_act, batch_norm
from ._launch import INTERPRETING, forced_int64, poisoned_scratch, recorded_launches, recording_only
from .activations import ACTIVATIONS, DERIVATIVE_FROM_OUTPUT

if INTERPRETING:  # bf16 results rounded as the GPU rounds them (_interpreter.py)
    from ._interpreter import round_bf16_to_nearest_even

    round_bf16_to_nearest_even()

__all__ = ["add_act", "batch_norm", "INTERPRETING", "forced_int64", "poisoned_scratch", "recorded_launches",
           "recording_only", "ACTIVATIONS", "DERIVATIVE_FROM_OUTPUT"]
