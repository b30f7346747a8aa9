"""BatchNormReLU2d and AddReLU against nn.BatchNorm2d + ReLU, and the seed's fused blocks against the seed's eager
code (tests/seed_reference.py): state_dict round trips both ways, outputs, gradients, running statistics."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fusedres
from tests import seed_reference as seed
from tests.helpers import DEVICE, FULL, assert_close, assert_models_match, make_input, randomize_batch_norms


def _pair(**kwargs):
    reference = randomize_batch_norms(nn.BatchNorm2d(6, **kwargs)).to(DEVICE, torch.float64)
    fused = fusedres.BatchNormReLU2d(6, **kwargs).to(DEVICE, torch.float64)
    fused.load_state_dict(reference.state_dict())
    return fused, reference


@pytest.mark.parametrize("kwargs", [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
                                    dict(momentum=None, track_running_stats=False), dict(eps=1e-3, momentum=0.3)],
                         ids=str)
@pytest.mark.parametrize("residual", [False, True])
def test_batch_norm_relu_keeps_batch_norm_bookkeeping(kwargs, residual):
    fused, reference = _pair(**kwargs)
    for step, training in enumerate([True, True, False, True, False]):
        fused.train(training)
        reference.train(training)
        x = make_input((3, 6, 4, 5), torch.float64, channels_last=step % 2 == 1).requires_grad_()
        r = make_input(x.shape, torch.float64) if residual else None
        x_ref = x.detach().clone().requires_grad_()
        y = fused(x, r)
        y_ref = torch.relu(reference(x_ref) + (r if residual else 0))
        assert_close(y, y_ref, f"output at step {step}")
        y.backward(torch.ones_like(y))
        y_ref.backward(torch.ones_like(y_ref))
        assert_close(x.grad, x_ref.grad, f"grad of input at step {step}")
        assert_models_match(fused, reference, f"step {step}")


def test_batch_norm_relu_state_dict_and_repr():
    module = fusedres.BatchNormReLU2d(8, momentum=None)
    assert isinstance(module, nn.BatchNorm2d)
    assert list(module.state_dict()) == list(nn.BatchNorm2d(8).state_dict())
    assert repr(module) == repr(nn.BatchNorm2d(8, momentum=None)).replace("BatchNorm2d", "BatchNormReLU2d")
    old_checkpoint = nn.BatchNorm2d(8).state_dict()
    del old_checkpoint["num_batches_tracked"]  # a checkpoint from before num_batches_tracked existed:
    old_checkpoint._metadata[""]["version"] = 1  # written by nn.BatchNorm2d's version 1
    eager = nn.BatchNorm2d(8, momentum=None)
    for m in (module, eager):
        m.num_batches_tracked.fill_(5)
        m.load_state_dict(old_checkpoint)
    assert torch.equal(module.num_batches_tracked, eager.num_batches_tracked)
    assert torch.equal(module.running_var, old_checkpoint["running_var"])


def test_batch_norm_relu_empty_batch_and_bad_input():
    fused, reference = _pair()
    fused.train()
    before = fused.running_mean.clone()
    y = fused(torch.empty((0, 6, 3, 3), device=DEVICE, dtype=torch.float64))
    assert y.shape == (0, 6, 3, 3) and torch.equal(fused.running_mean, before)
    with pytest.raises(ValueError, match="expected 4D input"):
        fused(torch.randn(6, 3, 3, device=DEVICE, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"BatchNormReLU2d: residual shape"):
        fused(make_input((2, 6, 3, 3), torch.float64), make_input((2, 6, 3, 4), torch.float64))


def test_add_relu_module():
    x, r = make_input((2, 3, 4, 4), torch.float32, shift=0.0), make_input((2, 3, 4, 4), torch.float32, shift=0.0)
    assert_close(fusedres.AddReLU()(x, r), torch.relu(x.double() + r.double()), "output")


SEED_BLOCKS = [
    ("BasicBlock", (6,), (2, 6, 5, 7)),
    ("ProjectionBlock", (6, 10, 2), (2, 6, 9, 7)),
    ("ProjectionBlock", (6, 6, 1), (2, 6, 5, 5)),
    ("BottleneckBlock", (8, 4, 8, 1), (2, 8, 5, 6)),
    ("BottleneckBlock", (6, 4, 12, 2), (2, 6, 7, 7)),
    ("PreActBlock", (5,), (2, 5, 6, 6)),
    pytest.param("SmallResNet", (7,), (2, 3, 12, 12), marks=FULL),  # (--full: 7-9 s; the blocks are the contract)
]


@pytest.mark.parametrize("name,args,shape", SEED_BLOCKS,
                         ids=[f"{n}{a}" for n, a, _ in (b.values if hasattr(b, "values") else b for b in SEED_BLOCKS)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_seed_blocks_match_the_seed_and_share_its_checkpoints(name, args, shape, channels_last):
    reference = randomize_batch_norms(getattr(seed, name)(*args)).to(DEVICE, torch.float64)
    fused = getattr(fusedres, name)(*args).to(DEVICE, torch.float64)
    assert list(fused.state_dict()) == list(reference.state_dict())
    fused.load_state_dict(reference.state_dict())  # seed checkpoint -> fused block
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    fused, reference = fused.to(memory_format=fmt), reference.to(memory_format=fmt)
    for step, training in enumerate([True, True, False]):
        fused.train(training)
        reference.train(training)
        x = make_input(shape, torch.float64, channels_last)
        y, y_ref = fused(x), reference(x)
        assert_close(y, y_ref, f"{name} output, step {step}")
        y.square().sum().backward()
        y_ref.square().sum().backward()
        assert_models_match(fused, reference, f"{name} step {step}")
        for model in (fused, reference):
            with torch.no_grad():
                for param in model.parameters():
                    param -= 0.01 * param.grad
                    param.grad = None
    back = getattr(seed, name)(*args).to(DEVICE, torch.float64)
    back.load_state_dict(fused.state_dict())  # fused checkpoint -> seed block
    for key, value in back.state_dict().items():
        assert torch.equal(value, fused.state_dict()[key])


def test_fused_blocks_revert_to_the_seed_classes():
    fused = fusedres.SmallResNet()
    reverted = fusedres.revert(fused)
    assert type(reverted).__name__ == "SmallResNet" and type(reverted).__module__ == "fusedres.seed"
    assert type(reverted.stage2[0]).__module__ == "fusedres.seed"
    kinds = {type(m) for m in reverted.modules()}
    assert fusedres.BatchNormReLU2d not in kinds and nn.BatchNorm2d in kinds and nn.ReLU in kinds
    assert type(fused) is fusedres.SmallResNet, "revert(inplace=False) must leave the fused model as it is"
    x = make_input((2, 3, 8, 8), torch.float32)
    fused.eval()
    reverted.eval()
    assert_close(fused(x), reverted(x).double(), "output")
    assert copy.deepcopy(fused).state_dict().keys() == reverted.state_dict().keys()
