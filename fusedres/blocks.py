"""The seed's blocks, fused: same constructor signatures and state_dict keys as the seed's eager code
(``fusedres.seed``), so checkpoints load in both directions; ``fusedres.revert`` gives back the eager classes.

Inside ``residual``, each batch-norm followed by a ReLU is a BatchNormReLU2d and the ReLU an
ActivationFusedAway; the last batch-norm before the shortcut add is a BatchNormReLU2d that the block's forward
calls with the shortcut, so ``block.residual`` alone no longer computes F(x): the block's forward is the
contract."""
from __future__ import annotations

from torch import nn

from . import seed
from .converted import fuse_activation_module, fused_site
from .modules import BatchNormReLU2d, refuse_scripting

__all__ = ["BasicBlock", "ProjectionBlock", "BottleneckBlock", "PreActBlock", "SmallResNet"]


class _FusedSeedBlock:
    """A seed block fused in place: ``relu_sites`` index the batch-norms of ``residual`` followed by a ReLU,
    ``add_site`` the batch-norm followed by the shortcut add and the ReLU (None: no activation after the add)."""

    _fusedres_unfused_class: type
    relu_sites: tuple[int, ...] = ()
    add_site: int | None = None
    __prepare_scriptable__ = refuse_scripting

    @classmethod
    def fuse(cls, block: nn.Module) -> nn.Module:
        block.__class__ = cls
        for index in cls.relu_sites:
            fuse_activation_module(block.residual, str(index), str(index + 1))
        if cls.add_site is not None:
            BatchNormReLU2d.fuse(block.residual[cls.add_site], with_residual=True)
        return block

    def _fused_residual(self, x, shortcut):
        modules = list(self.residual)
        for module in modules[:self.add_site]:
            x = module(x)
        return fused_site(modules[self.add_site], x, shortcut, activation_module=self.activation)


class BasicBlock(_FusedSeedBlock, seed.BasicBlock):
    """``relu(x + F(x))``, F = conv3x3, batch-norm + ReLU, conv3x3, batch-norm; fused."""

    _fusedres_unfused_class = seed.BasicBlock
    relu_sites, add_site = (1,), 4

    def __init__(self, channels):
        super().__init__(channels)
        self.fuse(self)

    def forward(self, x):
        return self._fused_residual(x, x)


class ProjectionBlock(_FusedSeedBlock, seed.ProjectionBlock):
    """``relu(F(x) + W_s x)`` with a 1x1 conv + batch-norm projection shortcut; fused."""

    _fusedres_unfused_class = seed.ProjectionBlock
    relu_sites, add_site = (1,), 4

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__(in_channels, out_channels, stride)
        self.fuse(self)

    def forward(self, x):
        return self._fused_residual(x, self.shortcut(x))


class BottleneckBlock(_FusedSeedBlock, seed.BottleneckBlock):
    """1x1 reduce, 3x3, 1x1 expand, then add + ReLU; fused."""

    _fusedres_unfused_class = seed.BottleneckBlock
    relu_sites, add_site = (1, 4), 7

    def __init__(self, in_channels, bottleneck_channels, out_channels, stride=1):
        super().__init__(in_channels, bottleneck_channels, out_channels, stride)
        self.fuse(self)

    def forward(self, x):
        return self._fused_residual(x, self.shortcut(x))


class PreActBlock(_FusedSeedBlock, seed.PreActBlock):
    """``x + F(x)``, F = batch-norm + ReLU, conv, batch-norm + ReLU, conv (no activation after the add); fused.
    The seed's forward serves unchanged: its batch-norm + ReLU pairs are fused inside ``residual``."""

    _fusedres_unfused_class = seed.PreActBlock
    relu_sites = (0, 3)

    def __init__(self, channels):
        super().__init__(channels)
        self.fuse(self)


FUSED_SEED_BLOCKS = {seed.BasicBlock: BasicBlock, seed.ProjectionBlock: ProjectionBlock,
                     seed.BottleneckBlock: BottleneckBlock, seed.PreActBlock: PreActBlock}


class SmallResNet(seed.SmallResNet):
    """The seed's SmallResNet built from the fused blocks, with a fused stem."""

    _fusedres_unfused_class = seed.SmallResNet

    def __init__(self, num_classes=10):
        super().__init__(num_classes)
        self.fuse(self)

    @classmethod
    def fuse(cls, model: seed.SmallResNet) -> seed.SmallResNet:
        model.__class__ = cls
        fuse_activation_module(model.stem, "1", "2")
        for stage in (model.stage1, model.stage2, model.stage3):
            for block in stage:
                if type(block) in FUSED_SEED_BLOCKS:  # (blocks fused already are left as they are)
                    FUSED_SEED_BLOCKS[type(block)].fuse(block)
        return model


FUSED_SEED_CLASSES = {**FUSED_SEED_BLOCKS, seed.SmallResNet: SmallResNet}
