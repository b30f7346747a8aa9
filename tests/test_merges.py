"""The last-program merges (docs/design.md, "Launches: the last-program merge") under stress, in both reductions
that merge: the statistics and the backward's sums. Many splits, a split count that leaves a tail for the merge's
``BLOCK_S`` rows, partial rows poisoned with NaN before every launch (the suite runs under ``poisoned_scratch``,
tests/conftest.py), outputs poisoned too, and two inputs with different statistics alternating, each result checked
against its own fp64 reference and, bit for bit, against the first result on the same input.

On a GPU thousands of programs finish together: a merge that read a partial row before its writer's stores were
visible, or fired before every program had stored, would read NaN or the other input's row and show. Under the
interpreter (programs run one after another, so no race can show) the same checks run at small sizes and prove the
bookkeeping; the last test shows that they fail when a merge fires one program early."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from fusedres.kernels import batch_norm as BK
from fusedres.kernels.walk import overridden_constants, ticket_counter_buffers
from tests.helpers import DEVICE, assert_close, make_input, make_params


@dataclass(frozen=True)
class StressCase:
    shape: tuple[int, int, int, int]
    tiles: dict                    # the launchers' tile overrides: many splits
    calls: int                     # launches per test, alternating between the two inputs
    constants: dict = field(default_factory=dict)  # launch constants overridden (a small BLOCK_S under the interpreter)


# GPU: 2989 splits per channel block, 3 channel blocks, BLOCK_S = 64 (2989 = 46 * 64 + 45). Interpreter: 21 splits,
# BLOCK_S = 8 (21 = 2 * 8 + 5), 21 programs of one 64-channel row each.
CASE = (StressCase(shape=(61, 24, 28, 28), tiles=dict(block_rows=16, block_channels=8, target_programs=1 << 16),
                   calls=200)
        if DEVICE.type == "cuda" else
        StressCase(shape=(3, 64, 1, 7),
                   tiles=dict(block_rows=1, block_channels=64, target_programs=1 << 10, slab=False), calls=4,
                   constants=dict(merge_block_splits=4)))


def _poisoned(*shape):
    return torch.full(shape, float("nan"), dtype=torch.float32, device=DEVICE)


def _two_inputs(channels_last: bool) -> list[torch.Tensor]:
    """Inputs whose every per-channel statistic differs, so that a row of one read for the other shows."""
    return [make_input(CASE.shape, torch.float32, channels_last, scale=2.0, shift=0.5),
            make_input(CASE.shape, torch.float32, channels_last, scale=0.25, shift=-3.0)]


def _assert_tail_and_many_splits(x: torch.Tensor) -> None:
    plan = BK._plan(x, **CASE.tiles)[1]
    assert plan.splits > plan.merge_block_splits and plan.splits % plan.merge_block_splits, (
        f"the stress case must merge several BLOCK_S steps and a tail: {plan.splits} splits, BLOCK_S "
        f"{plan.merge_block_splits}")


def _assert_counters_back_at_zero() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    on_this_device = [counters for (device, _), counters in ticket_counter_buffers().items()
                      if device.type == DEVICE.type]
    assert on_this_device and all(int(counters.abs().sum()) == 0 for counters in on_this_device), (
        "ticket counters not reset")  # (other tests' launches recorded on meta tensors keep meta counters)


def _check_calls(launch, references: list[tuple], names: tuple[str, ...], x: torch.Tensor) -> None:
    """``CASE.calls`` launches alternating between the two inputs: ``launch(which)`` gives the results of one call
    on input ``which``; the first on each input is held to its fp64 ``references[which]``, every later one to that
    first result, bit for bit; the counters are back at zero at the end."""
    firsts: dict[int, tuple] = {}
    with overridden_constants(**CASE.constants):
        _assert_tail_and_many_splits(x)
        for call in range(CASE.calls):
            which = call % 2
            results = launch(which)
            if which not in firsts:
                for what, result, reference in zip(names, results, references[which]):
                    assert_close(result, reference, f"input {which}: {what}")
                firsts[which] = results
            for what, result, first in zip(names, results, firsts[which]):
                assert torch.equal(result, first), f"call {call} (input {which}): {what} differs from the first call"
    _assert_counters_back_at_zero()


def _check_statistics_merges(channels_last: bool) -> None:
    """Batch mean and variance and the running statistics moved by the merging program, call after call."""
    inputs = _two_inputs(channels_last)
    channels = CASE.shape[1]
    running_mean, running_var, _, _ = make_params(channels, torch.float32)
    references = []
    for x in inputs:
        var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
        n = x.numel() // channels
        references.append((mean, var, 0.9 * running_mean.double() + 0.1 * mean,
                           0.9 * running_var.double() + 0.1 * var * n / (n - 1)))

    def launch(which):
        mean, var = _poisoned(channels), _poisoned(channels)
        moved_mean, moved_var = running_mean.clone(), running_var.clone()
        BK.bn_batch_stats(inputs[which], mean, var, moved_mean, moved_var, momentum=0.1, **CASE.tiles)
        return mean, var, moved_mean, moved_var

    _check_calls(launch, references, ("mean", "var", "running_mean", "running_var"), inputs[0])


def _check_backward_merges(channels_last: bool) -> None:
    """sum(dz), sum(dz * xhat), dweight and dbias, written by the merging program of the backward's reduce."""
    inputs = _two_inputs(channels_last)
    channels = CASE.shape[1]
    _, _, weight, bias = make_params(channels, torch.float32)
    grad_y = make_input(CASE.shape, torch.float32, channels_last, scale=1.0, shift=1.0)  # nonzero sums
    statistics, references = [], []
    for x in inputs:
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        statistics.append((mean, var))
        x64, mean64, var64 = x.double(), mean.double()[:, None, None], var.double()[:, None, None]
        xhat = (x64 - mean64) / torch.sqrt(var64 + 1e-5)
        z = xhat * weight.double()[:, None, None] + bias.double()[:, None, None]
        dz = grad_y.double() * torch.func.grad(lambda t: torch.nn.functional.silu(t).sum())(z)
        sums = torch.stack([dz.sum(dim=(0, 2, 3)), (dz * xhat).sum(dim=(0, 2, 3))])
        references.append((sums, sums[1], sums[0]))

    def launch(which):
        sums, grad_weight, grad_bias = _poisoned(2, channels), _poisoned(channels), _poisoned(channels)
        BK.bn_act_backward_reduce(grad_y, inputs[which], *statistics[which], weight, bias, 1e-5, sums_out=sums,
                                  activation="silu", grad_weight_out=grad_weight, grad_bias_out=grad_bias,
                                  **CASE.tiles)
        return sums, grad_weight, grad_bias

    _check_calls(launch, references, ("sums", "grad_weight", "grad_bias"), inputs[0])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_statistics_merges_see_every_partial_row(channels_last):
    _check_statistics_merges(channels_last)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_backward_merges_see_every_partial_row(channels_last):
    _check_backward_merges(channels_last)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="on a GPU an early merge may still find every row stored, by "
                                                  "timing; the interpreter's program order makes it fail surely")
@pytest.mark.parametrize("check", [_check_statistics_merges, _check_backward_merges],
                         ids=["statistics", "backward"])
def test_the_merge_checks_fail_when_a_merge_fires_one_program_early(check, monkeypatch):
    """Counters that start at 1: the program drawing ticket ``splits - 1`` is the next-to-last to finish, so it
    merges before the last program has stored its partial row (NaN, poisoned), and the last one merges nothing."""
    monkeypatch.setattr(BK, "ticket_counters",
                        lambda device, count: torch.ones(count, dtype=torch.int32, device=device))
    with pytest.raises(AssertionError, match="NaN"):
        check(channels_last=False)
