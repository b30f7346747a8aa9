"""Triton kernels and their launchers. Nothing here allocates outputs, knows autograd or picks a backend:
that is the op layer's (``fusedres/ops.py``)."""
from . import add_relu, batch_norm
from ._launch import INTERPRETING, forced_int64, recorded_launches, recording_only

__all__ = ["add_relu", "batch_norm", "INTERPRETING", "forced_int64", "recorded_launches", "recording_only"]
