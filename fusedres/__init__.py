"""fusedres: fused batch-norm + activation, batch-norm + add + activation and add + activation for CNNs, from
residual networks on.

``import fusedres`` touches no GPU: the backend is chosen per call, from the tensors given.
"""
from . import functional
from .blocks import BasicBlock, BottleneckBlock, PreActBlock, ProjectionBlock, SmallResNet
from .convert import conversion_report, convert, convert_sync_batchnorm, revert
from .memory import save_memory, saves_memory, saving_memory
from .modules import (AddReLU, BatchNormAct, BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, BatchNormReLU1d,
                      BatchNormReLU2d, BatchNormReLU3d, FrozenBatchNormAct2d, SyncBatchNormAct2d)
from .ops import disabled, is_disabled

__version__ = "0.1.0"

__all__ = ["functional", "BatchNormAct", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "BatchNormReLU1d",
           "BatchNormReLU2d", "BatchNormReLU3d", "SyncBatchNormAct2d", "FrozenBatchNormAct2d", "AddReLU", "BasicBlock",
           "ProjectionBlock", "BottleneckBlock", "PreActBlock", "SmallResNet", "convert", "revert",
           "conversion_report", "convert_sync_batchnorm", "save_memory", "saves_memory", "saving_memory", "disabled",
           "is_disabled", "__version__"]
