"""fusedres: fused batch-norm + ReLU, batch-norm + add + ReLU and add + ReLU for residual networks.

``import fusedres`` touches no GPU: the backend is chosen per call, from the tensors given.
"""
from . import functional
from .ops import disabled, is_disabled

__version__ = "0.1.0"

__all__ = ["functional", "disabled", "is_disabled", "__version__"]
