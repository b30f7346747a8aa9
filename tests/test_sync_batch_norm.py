"""Synchronized batch-norm over torch.distributed: SyncBatchNormAct2d across 2 and 3 processes on gloo (the kernels
in Triton's interpreter, each process on its own CPU cores) against single-process eager batch-norm on the
concatenated batch; a DistributedDataParallel training step of a converted torchvision resnet18; and the
conversions in and out of synchronized batch-norm."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fusedres
from tests.distributed_workers import ddp_worker, module_worker, run_ranks
from tests.helpers import FULL, assert_close, randomize_batch_norms


@pytest.mark.parametrize("world,sizes,dtype,activation,residual,momentum,use_kernels", [
    (2, [3, 1], torch.float64, "relu", True, 0.1, True),       # unequal batches; the derivative from the output
    (3, [2, 0, 3], torch.float32, "silu", True, None, True),   # an empty rank; from the residual; cumulative average
    (2, [1, 2], torch.float32, "identity", False, 0.3, True),  # no residual, no activation
    (3, [2, 0, 3], torch.float64, "gelu", True, 0.1, False),   # the eager path (fusedres.disabled)
], ids=["2-ranks-fp64-relu", "3-ranks-empty-rank-fp32-silu", "2-ranks-fp32-identity", "3-ranks-eager-path-gelu"])
@FULL
def test_sync_batch_norm_act_matches_eager_on_the_concatenated_batch(world, sizes, dtype, activation, residual,
                                                                     momentum, use_kernels):
    """(--full: 2 or 3 spawned processes importing torch, 7-13 s each.)"""
    run_ranks(module_worker, world, "gloo", sizes, dtype, activation, residual, momentum, use_kernels)


@pytest.mark.parametrize("synchronized,save_memory", [(True, False), (False, False), (True, True)],
                         ids=["convert_sync_batchnorm", "per-rank-statistics", "convert_sync_batchnorm-save_memory"])
@FULL
def test_ddp_training_step_of_a_converted_resnet18(synchronized, save_memory):
    """(--full: two spawned processes training resnet18 in the interpreter, 12-22 s.)"""
    pytest.importorskip("torchvision")
    run_ranks(ddp_worker, 2, "gloo", synchronized, save_memory)


def test_without_a_process_group_it_is_a_batch_norm_act():
    assert not dist.is_initialized()
    module = randomize_batch_norms(fusedres.SyncBatchNormAct2d(4, act_layer="mish", dtype=torch.float64))
    reference = nn.BatchNorm2d(4, dtype=torch.float64)
    reference.load_state_dict(module.state_dict())
    for training in (True, False):
        module.train(training)
        reference.train(training)
        x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
        assert_close(module(x), F.mish(reference(x)), f"training={training}")
    assert list(module.state_dict()) == list(nn.SyncBatchNorm(4).state_dict())


def test_convert_sync_batchnorm_keeps_the_fusion_and_revert_undoes_it():
    torchvision = pytest.importorskip("torchvision")
    model = fusedres.convert(torchvision.models.resnet18(num_classes=10))
    patterns = {name: m.fused_pattern for name, m in model.named_modules() if isinstance(m, fusedres.BatchNormAct2d)}
    synced = fusedres.convert_sync_batchnorm(model)
    batch_norms = [m for m in synced.modules() if isinstance(m, nn.BatchNorm2d)]
    assert batch_norms and all(type(m) is fusedres.SyncBatchNormAct2d for m in batch_norms)
    for name, pattern in patterns.items():
        assert synced.get_submodule(name).fused_pattern == pattern
    assert synced.layer2[0].downsample[1].activation == "identity"  # a plain batch-norm: synchronized, fused
    # revert gives what torch's converter would have made of the model: nn.SyncBatchNorm everywhere
    reverted = fusedres.revert(synced)
    batch_norms = [m for m in reverted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(batch_norms) == 20 and {type(m) for m in batch_norms} == {nn.SyncBatchNorm}
    assert all(m.process_group is None for m in batch_norms)


def test_convert_fuses_sync_batch_norms_and_revert_gives_them_back():
    torchvision = pytest.importorskip("torchvision")
    model = nn.SyncBatchNorm.convert_sync_batchnorm(torchvision.models.resnet18(num_classes=10))
    fused = fusedres.convert(model)
    report = fusedres.conversion_report(fused)
    assert len(report["batch_norm_relu"]) == 9 and len(report["batch_norm_add_relu"]) == 8
    assert type(fused.bn1) is fusedres.SyncBatchNormAct2d and fused.bn1.activation == "relu"
    reverted = fusedres.revert(fused)
    assert {type(m) for m in reverted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)} == {nn.SyncBatchNorm}


def test_torch_convert_sync_batchnorm_on_a_converted_model_warns_and_names_fusedres_counterpart():
    torchvision = pytest.importorskip("torchvision")
    fused = fusedres.convert(randomize_batch_norms(torchvision.models.resnet18(num_classes=10).double()))
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(fused).eval()
    fusedres.modules._warned_once.clear()
    with pytest.warns(UserWarning, match="fusedres.convert_sync_batchnorm"):
        synced(torch.randn(1, 3, 32, 32, dtype=torch.float64))


class _ConvHead(nn.Module):
    """A convolutional stem and a 1-D batch-norm head: both fuse, of their own ranks."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.linear = nn.Linear(4, 6)
        self.head_bn = nn.BatchNorm1d(6)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return torch.relu(self.head_bn(self.linear(y)))


def test_convert_sync_batchnorm_synchronizes_batch_norms_of_every_rank():
    converted = fusedres.convert(_ConvHead())
    assert type(converted.head_bn) is fusedres.BatchNormReLU1d
    model = fusedres.convert_sync_batchnorm(converted)
    assert type(model.bn) is fusedres.SyncBatchNormAct2d and model.bn.activation == "relu"
    assert type(model.head_bn) is fusedres.SyncBatchNormAct2d and model.head_bn.activation == "relu"
    # torch's converter first: fusedres.convert then fuses the nn.SyncBatchNorms, whatever their inputs' rank
    fused = fusedres.convert(nn.SyncBatchNorm.convert_sync_batchnorm(_ConvHead()))
    assert type(fused.bn) is fusedres.SyncBatchNormAct2d and type(fused.head_bn) is fusedres.SyncBatchNormAct2d
    fused.eval()
    reference = fusedres.revert(fused)
    assert type(reference.head_bn) is nn.SyncBatchNorm
    x = torch.randn(2, 3, 6, 6)
    assert_close(fused(x), reference(x), "a converted model with a 1-D synchronized head")
    # revert after convert_sync_batchnorm: what torch's converter makes of each (nn.SyncBatchNorm)
    assert type(fusedres.revert(model).head_bn) is nn.SyncBatchNorm


def test_convert_sync_batchnorm_takes_timm_batch_norm_act_and_refuses_what_it_cannot_fuse():
    timm_layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(timm_layers.BatchNormAct2d(4, act_layer=nn.SiLU))
    synced = fusedres.convert_sync_batchnorm(model)
    assert isinstance(synced[0], fusedres.SyncBatchNormAct2d) and synced[0].activation == "silu"
    # still a timm BatchNormAct2d to timm's tools; revert gives what timm's converter would have made
    assert isinstance(synced[0], timm_layers.BatchNormAct2d) and repr(synced[0]).startswith("SyncBatchNormAct2d(")
    assert type(fusedres.revert(synced)[0]) is timm_layers.norm_act.SyncBatchNormAct
    unfusable = nn.Sequential(nn.BatchNorm2d(4), timm_layers.BatchNormAct2d(4, act_layer=nn.PReLU))
    with pytest.raises(TypeError, match=r"convert_sync_batchnorm: .*1.*PReLU"):
        fusedres.convert_sync_batchnorm(unfusable)
    assert type(unfusable[0]) is nn.BatchNorm2d  # refused before anything changed
