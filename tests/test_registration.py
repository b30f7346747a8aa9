"""The registered ops as torch sees them: opcheck, torch.compile without graph breaks, import without a GPU,
the FUSEDRES_DISABLE switch, and a static check that no kernel uses float atomics."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import fusedres  # noqa: F401  (registers the ops)
import fusedres.functional as FF
from tests.helpers import DEVICE, assert_close, fp64_copy, make_input, make_params, reference_batch_norm_act

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bn_samples():
    """(input, residual, weight, bias, mean, var, training, eps, activation, negative_slope): the batch's
    statistics when training; each way the backward gets its activation's derivative (from the input, from the
    output, from the residual, none)."""
    cases = [(False, True, None, "relu"), (True, False, torch.float32, "relu"), (False, True, torch.bfloat16, "silu"),
             (True, True, torch.float32, "identity"), (False, False, None, "leaky_relu"),
             (True, True, torch.float32, "gelu_tanh")]
    for channels_last, training, residual_dtype, activation in cases:
        x = make_input((2, 5, 3, 4), torch.float32, channels_last).requires_grad_()
        r = None if residual_dtype is None else make_input(x.shape, residual_dtype).requires_grad_()
        rm, rv, w, b = make_params(5, torch.float32)
        w.requires_grad_()
        if training:
            rm, rv = torch.ops.fusedres.batch_norm_stats_(x.detach(), None, None, 0.1, None)
        yield (x, r, w, b, rm, rv, training, 1e-5, activation, 0.2)


def test_opcheck_batch_norm_act():
    for args in _bn_samples():
        torch.library.opcheck(torch.ops.fusedres.batch_norm_act.default, args)


def test_opcheck_batch_norm_act_backward():
    for x, r, w, b, mean, var, training, eps, activation, slope in _bn_samples():
        x, w, b = x.detach(), w.detach(), b.detach()
        r = None if r is None else r.detach()
        y = torch.ops.fusedres.batch_norm_act(x, r, w, b, mean, var, training, eps, activation, slope)
        g = make_input(y.shape, y.dtype, shift=0.0)
        source = fusedres.ops.pre_activation_source(activation, r is not None)
        args = (g, x, r if source == "residual" else None, y if source == "output" else None, w, b, mean, var,
                training, eps, activation, slope, [True, source != "none", True, True])
        torch.library.opcheck(torch.ops.fusedres.batch_norm_act_backward.default, args)


def test_opcheck_batch_norm_stats():
    x = make_input((3, 5, 2, 4), torch.float32)
    rm, rv, _, _ = make_params(5, torch.float32)
    nbt = torch.tensor(3, device=DEVICE)
    for running, num_batches_tracked in (((None, None), None), ((rm, rv), None), ((rm, rv), nbt)):
        torch.library.opcheck(torch.ops.fusedres.batch_norm_stats_.default, (x, *running, 0.1, num_batches_tracked))


def test_opcheck_add_act():
    for layouts, activation in (((False, False), "relu"), ((True, False), "mish"), ((False, False), "relu6")):
        x = make_input((2, 3, 4, 5), torch.float32, layouts[0], shift=0.0).requires_grad_()
        r = make_input((2, 3, 4, 5), torch.float16, layouts[1], shift=0.0).requires_grad_()
        torch.library.opcheck(torch.ops.fusedres.add_act.default, (x, r, activation, 0.01))
        y = torch.ops.fusedres.add_act(x.detach(), r.detach(), activation, 0.01)
        summands = (y, None) if activation in ("relu", "relu6") else (x.detach(), r.detach())
        torch.library.opcheck(torch.ops.fusedres.act_backward.default, (torch.randn_like(y), *summands, activation,
                                                                         0.01))


@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_compile_traces_without_graph_breaks(channels_last):
    torch._dynamo.reset()

    def block(x, r, rm, rv, w, b, w2, b2):
        y = FF.batch_norm_relu(x, rm, rv, w, b, training=True)
        y = FF.batch_norm_add_relu(y, r, None, None, w2, b2, training=True)
        return FF.add_relu(y, r)

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True, dynamic=False)
    # fp64: two chained batch-norms amplify fp32 rounding past a single op's tolerance.
    x = make_input((2, 6, 3, 5), torch.float64, channels_last).requires_grad_()
    r = make_input(x.shape, torch.float64, channels_last).requires_grad_()
    rm, rv, w, b = make_params(6, torch.float64)
    _, _, w2, b2 = make_params(6, torch.float64)
    for p in (w, b, w2, b2):
        p.requires_grad_()
    ref_rm, ref_rv = fp64_copy(rm), fp64_copy(rv)
    y = compiled(x, r, rm, rv, w, b, w2, b2)
    leaves64 = [fp64_copy(t, True) for t in (x, r, w, b, w2, b2)]
    x64, r64, w64, b64, w264, b264 = leaves64
    y64 = reference_batch_norm_act(x64, None, ref_rm, ref_rv, w64, b64, True)
    y64 = torch.relu(reference_batch_norm_act(y64, r64, None, None, w264, b264, True) + r64)
    assert_close(y, y64, "output")
    assert_close(rm, ref_rm, "running_mean (mutated inside the compiled graph)")
    assert_close(rv, ref_rv, "running_var (mutated inside the compiled graph)")
    grads = torch.autograd.grad(y.sum(), (x, r, w, b, w2, b2))
    ref_grads = torch.autograd.grad(y64.sum(), leaves64)
    for i, (grad, ref) in enumerate(zip(grads, ref_grads)):
        assert_close(grad, ref, f"grad {i}")


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_import_needs_no_gpu():
    # CUDA hidden: importing and eager use must work, and must not initialise CUDA.
    code = ("import torch, fusedres, fusedres.functional as FF\n"
            "x = torch.randn(2, 3, 4, 4)\n"
            "y = FF.batch_norm_relu(x, torch.zeros(3), torch.ones(3), training=True)\n"
            "assert y.shape == x.shape\n"
            "assert not torch.cuda.is_initialized()\n"
            "print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**env, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_fusedres_disable_environment_variable():
    code = ("import fusedres\n"
            "assert fusedres.is_disabled()\n"
            "with fusedres.disabled(False):\n"
            "    assert not fusedres.is_disabled()\n"
            "assert fusedres.is_disabled()\n"
            "print('ok')")
    result = _run_python(code, FUSEDRES_DISABLE="1")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_no_kernel_uses_float_atomics():
    # Reductions must be deterministic: partial rows merged in a fixed order, never float atomics. The one atomic
    # allowed is the integer ticket of the last-program merge, in one helper.
    sources = sorted((ROOT / "fusedres" / "kernels").glob("*.py"))
    assert sources
    allowed = "ticket = tl.atomic_add(ticket_ptr, 1, sem=\"acq_rel\", scope=\"gpu\")"
    for path in sources:
        lines = path.read_text().splitlines()
        found = [line.strip() for line in lines
                 if re.search(r"\btl\.atomic_\w+|\batomic_(?:add|cas|xchg|max|min|and|or|xor)\b", line)]
        assert all(line == allowed for line in found), f"{path.name} uses atomics: {found}"
