"""Each public op once against eager PyTorch on fp64 copies: inference, a training forward (running statistics
included) and its backward, in the primary configuration (bf16 channels_last) and in fp32 NCHW at a size that
takes the slab walk. Small and fast: the first step of bench/gpu_check.sh after its preflight (the first answer a
GPU lease gives), and what its compute-sanitizer step runs. The matrices behind these checks are
tests/test_batch_norm_act.py and tests/test_add_act.py."""
from __future__ import annotations

import pytest
import torch

import fusedres.functional as FF
from tests.helpers import REFERENCE_ACTIVATIONS, DEVICE, assert_close, fp64_copy, make_input, make_params

ON_GPU = DEVICE.type == "cuda"
CONFIGURATIONS = {  # name -> (shape, dtype, channels_last)
    "bf16-channels_last": ((8, 64, 28, 28) if ON_GPU else (2, 8, 5, 5), torch.bfloat16, True),
    "fp32-nchw-slab": ((8, 128, 7, 7) if ON_GPU else (2, 8, 3, 3), torch.float32, False),
}
# (op, activation): the three ReLU ops and batch-norm + add + another activation
OPS = [("batch_norm_relu", "relu"), ("batch_norm_add_relu", "relu"), ("add_relu", "relu"),
       ("batch_norm_add_act", "silu")]


def _fused(op, activation, x, r, rm, rv, w, b, training):
    if op == "add_relu":
        return FF.add_relu(x, r)
    if op == "batch_norm_relu":
        return FF.batch_norm_relu(x, rm, rv, w, b, training)
    if op == "batch_norm_add_relu":
        return FF.batch_norm_add_relu(x, r, rm, rv, w, b, training)
    return FF.batch_norm_act(x, rm, rv, w, b, training, residual=r, activation=activation)


def _pre_activation64(op, x, r, w, b, rm, rv, training):
    """The fp64 pre-activation (before the activation) of the eager reference."""
    if op == "add_relu":
        return x + r
    z = torch.nn.functional.batch_norm(x, rm, rv, w, b, training)
    return z if op == "batch_norm_relu" else z + r


@pytest.mark.parametrize("configuration", list(CONFIGURATIONS))
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("op,activation", OPS, ids=[op for op, _ in OPS])
def test_op_matches_eager(op, activation, training, configuration):
    shape, dtype, channels_last = CONFIGURATIONS[configuration]
    x = make_input(shape, dtype, channels_last).requires_grad_()
    r = make_input(shape, dtype, channels_last).requires_grad_()
    rm, rv, w, b = make_params(shape[1], torch.float32)
    leaves = {"input": x, "residual": r, "weight": w.requires_grad_(), "bias": b.requires_grad_()}
    differentiable = {"add_relu": ("input", "residual"), "batch_norm_relu": ("input", "weight", "bias")}.get(
        op, ("input", "residual", "weight", "bias"))
    leaves64 = {name: fp64_copy(t, True) for name, t in leaves.items()}
    rm64, rv64 = fp64_copy(rm), fp64_copy(rv)

    y = _fused(op, activation, x, r, rm, rv, w, b, training)
    pre64 = _pre_activation64(op, *leaves64.values(), rm64, rv64, training)
    if activation == "relu":
        # Among many elements a few pre-activations lie within rounding of 0, where the fused kernel and fp64 may
        # pick different sides of the kink; the gradient's reference takes the forward's side.
        assert_close(y, torch.relu(pre64), "output")
        y64 = torch.where(y.detach() > 0, pre64, torch.zeros_like(pre64))
    else:
        y64 = REFERENCE_ACTIVATIONS[activation](pre64, 0.01)
        assert_close(y, y64, "output")
    if op != "add_relu":
        assert_close(rm, rm64, "running_mean")
        assert_close(rv, rv64, "running_var")
    grad = make_input(shape, dtype, channels_last, scale=1.0, shift=0.0)
    grads = torch.autograd.grad(y, [leaves[name] for name in differentiable], grad)
    expected = torch.autograd.grad(y64, [leaves64[name] for name in differentiable], grad.double())
    for name, actual, reference in zip(differentiable, grads, expected):
        assert_close(actual, reference, f"grad of {name}")
