"""ResNet-sized shapes on a GPU, against eager PyTorch in fp64: a training step (output, running statistics,
every gradient) and inference, in each dtype and layout, with and without the residual (3-D and (N, C) inputs
too). Fifty-six cases and about a
hundred kernel specialisations to compile: bench/gpu_check.sh runs this file after the race-critical tests, on
several pytest-xdist workers. Skipped without a CUDA GPU."""
from __future__ import annotations

import pytest
import torch

import fusedres.functional as FF
from tests.helpers import (INTERPRETING, assert_close, fp64_copy, make_input, reference_batch_norm_act,
                           training_inputs, training_step)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(INTERPRETING or not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# ResNet-50's, then other ranks: r3d_18's second stage (channels_last_3d when channels_last) and an MLP head (N, C).
SHAPES = [(32, 64, 56, 56), (32, 256, 14, 14), (32, 2048, 7, 7), (8, 64, 112, 112), (5, 37, 13, 11),
          (4, 128, 8, 28, 28), (4096, 512)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype,channels_last", [(torch.bfloat16, True), (torch.float32, False),
                                                 (torch.float16, True), (torch.float32, True)])
@pytest.mark.parametrize("residual", [False, True])
def test_large_shapes_match_eager(shape, dtype, channels_last, residual):
    x, r, rm, rv, w, b = training_inputs(shape, dtype, channels_last, residual)
    ref_rm, ref_rv = fp64_copy(rm), fp64_copy(rv)
    leaves64 = [fp64_copy(t, True) for t in (x, r, w, b) if t is not None]
    grad = make_input(shape, dtype, channels_last, scale=1.0, shift=0.0)
    y, *grads = training_step(x, r, rm, rv, w, b, grad)
    x64, *rest = leaves64
    r64 = rest.pop(0) if residual else None
    y64 = reference_batch_norm_act(x64, r64, ref_rm, ref_rv, *rest, True)
    assert_close(y, y64, "output")
    # Among millions of elements a few pre-activations lie within rounding of 0, where fp32 and fp64 may pick
    # different sides of the ReLU; the gradient reference takes the forward's side (the output is checked above).
    pre64 = torch.nn.functional.batch_norm(x64, None, None, rest[0], rest[1], True)
    pre64 = pre64 if r64 is None else pre64 + r64
    y64 = torch.where(y.detach() > 0, pre64, torch.zeros_like(pre64))
    ref_grads = torch.autograd.grad(y64, leaves64, grad.double())
    assert_close(rm, ref_rm, "running_mean")
    assert_close(rv, ref_rv, "running_var")
    for i, (g, ref) in enumerate(zip(grads, ref_grads)):
        assert_close(g, ref, f"grad {i}")
    with torch.no_grad():
        y = FF.batch_norm_add_relu(x, r, rm, rv, w, b) if residual else FF.batch_norm_relu(x, rm, rv, w, b)
        y64 = reference_batch_norm_act(x64.detach(), r64, fp64_copy(rm), fp64_copy(rv), *rest, False)
    assert_close(y, y64, "inference output")
