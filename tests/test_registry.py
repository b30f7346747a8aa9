"""One place for each fact (docs/design.md, "Layout"): every consumer of the activation table
(``fusedres/activations.py``) sees the same set, so adding an activation is one entry there plus its formula and
derivative in ``fusedres/kernels/activations.py``."""
from __future__ import annotations

import torch

import fusedres
import fusedres.functional as FF
from fusedres import activations, kernels
from fusedres.benchmark import cases
from fusedres.report import kernel_report
from tests.helpers import REFERENCE_ACTIVATIONS, assert_close, make_input

NAMES = set(activations.ACTIVATIONS)


def test_the_functions_kernels_modules_convert_benchmark_and_report_see_one_set():
    assert NAMES == set(FF.ACTIVATIONS) == set(kernels.ACTIVATIONS) == set(REFERENCE_ACTIVATIONS)
    assert set(kernels.DERIVATIVE_FROM_OUTPUT) <= NAMES
    # modules: every name builds a BatchNormAct2d applying it
    assert {fusedres.BatchNormAct2d(2, act_layer=name).activation for name in NAMES} == NAMES
    # convert: every module class and function spelling it recognises is one of them
    assert {activations.describe_activation(entry.module_class()) for entry in activations.TABLE} == \
        {(name, 0.01) for name in NAMES}
    assert set(activations.FUNCTIONS.values()) | set(activations.METHODS.values()) <= NAMES
    # the benchmark's eager baseline (its --activation choices are the table itself); the kernel report's cases
    assert {case["activation"] for case in kernel_report.activation_cases()} == NAMES - {"relu"}
    x = make_input((2, 3, 2, 2), torch.float64)
    for name in NAMES:
        assert_close(cases.eager_op("add_relu", False, name)(x, x, None, None, None, None),
                     REFERENCE_ACTIVATIONS[name](x + x, 0.01), f"the benchmark's eager {name}")


def test_every_activation_has_its_kernel_formula_and_derivative():
    """Each name through the fused add + activation, forward and backward, against the tests' own table."""
    for name in NAMES:
        x = make_input((2, 3, 4, 4), torch.float64).requires_grad_()
        r = make_input((2, 3, 4, 4), torch.float64)
        y = FF.add_act(x, r, activation=name, negative_slope=0.2)
        x64 = x.detach().clone().requires_grad_()
        expected = REFERENCE_ACTIVATIONS[name](x64 + r, 0.2)
        assert_close(y, expected, f"{name} forward")
        grad = torch.randn_like(y)
        assert_close(torch.autograd.grad(y, x, grad)[0], torch.autograd.grad(expected, x64, grad)[0],
                     f"{name} derivative")
