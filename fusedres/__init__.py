"""fusedres: fused batch-norm + ReLU, batch-norm + add + ReLU and add + ReLU for residual networks.

``import fusedres`` touches no GPU: the backend is chosen per call, from the tensors given.
"""
from . import functional
from .blocks import BasicBlock, BottleneckBlock, PreActBlock, ProjectionBlock, SmallResNet
from .convert import conversion_report, convert, revert
from .modules import AddReLU, BatchNormReLU2d
from .ops import disabled, is_disabled

__version__ = "0.1.0"

__all__ = ["functional", "BatchNormReLU2d", "AddReLU", "BasicBlock", "ProjectionBlock", "BottleneckBlock",
           "PreActBlock", "SmallResNet", "convert", "revert", "conversion_report", "disabled", "is_disabled",
           "__version__"]
