"""The kernel report (docs/design.md): every kernel the ops launch on ResNet-50's batch-norm shapes, compiled for
sm_90 as Triton's JIT specialises a real launch, read back from the cubin, and held to the limits: launches per op,
no local memory, at most 128 registers at 8 warps, full-width activation accesses (at least 64 bits on 16-bit
types, 128 on wider ones), no float atomics. No GPU needed; runs in a process without TRITON_INTERPRET."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.aot
@pytest.mark.full
def test_kernels_compiled_for_sm90_stay_within_the_report_limits():
    """(--full: compiles every op's kernels on ResNet-50's sites for sm_90, 70-120 s.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-m", "fusedres.report.kernel_report", "--jobs", str(os.cpu_count() or 1)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(result.stdout[-20000:])
    assert result.returncode == 0, f"{result.stdout[-8000:]}\n{result.stderr[-4000:]}"
    assert "0 over a limit" in result.stdout
