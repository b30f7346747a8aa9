"""fusedres-bench in its CPU quick mode: the files it writes and what their rows say."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from fusedres.benchmark import cli
from fusedres.benchmark.cases import floor_bytes
from fusedres.benchmark.report import ENV_FIELDS, ROW_FIELDS
from tests.helpers import INTERPRETING

pytestmark = pytest.mark.skipif(not INTERPRETING, reason="the CPU mode of the benchmark")
pytest.importorskip("matplotlib", reason="the benchmark writes a PNG plot")


def test_ops_suite_quick_cpu_run(tmp_path, capsys):
    assert cli.main(["--quick", "--suite", "ops", "--dtype", "fp32", "--layout", "channels_last,nchw",
                     "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "CPU run" in printed and "| op |" in printed
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["rows"]
    with open(tmp_path / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) and set(csv_rows[0]) == set(ROW_FIELDS + ENV_FIELDS)
    assert (tmp_path / "summary.md").read_text().startswith("## fusedres-bench")
    assert (tmp_path / "speedup.png").stat().st_size > 1000
    cases = {(r["op"], r["mode"], r["shape"], r["layout"]) for r in rows}
    assert len(cases) == 3 * 4 * 2  # ops x modes x layouts (one quick shape each on a CPU)
    for row in rows:
        assert row["torch"] == torch.__version__ and row["git_commit"] and row["device"].startswith("CPU")
        shape = tuple(int(s) for s in row["shape"].split("x"))
        assert row["floor_bytes"] == floor_bytes(row["op"], row["mode"], shape, torch.float32)
        if row["provider"] == "eager":
            assert row["ms"] > 0
            assert row["gbps"] == pytest.approx(row["floor_bytes"] / (row["ms"] * 1e-3) / 1e9)
        else:
            assert row["provider"] == "fusedres" and row["ms"] is None, "interpreter times are not speed"
            assert 0 <= row["max_abs_error"] < 1e-3, row


def test_blocks_models_and_numerics_quick_cpu_run(tmp_path):
    assert cli.main(["--quick", "--suite", "blocks,models,numerics", "--dtype", "fp32", "--numerics-steps", "2",
                     "--numerics-batch-size", "4", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    levels = {(r["level"], r["op"], r["mode"]) for r in rows}
    assert {("block", "seed.BasicBlock", "inference"), ("block", "torchvision.Bottleneck", "forward_backward"),
            ("model", "torchvision.resnet18", "inference"), ("model", "torchvision.resnet18", "train_step"),
            ("numerics", "seed.SmallResNet on digits", "train 2 steps")} <= levels
    for row in rows:
        if row["provider"] == "fusedres":
            assert row["ms"] is None and row["max_abs_error"] is not None
            assert row["max_abs_error"] < (1e-2 if row["level"] != "numerics" else 1e-1), row
        elif row["level"] != "numerics":
            assert row["ms"] > 0 and row["gbps"] is None, "GB/s is defined for ops only"
    numerics = json.loads((tmp_path / "numerics.json").read_text())
    assert set(numerics["losses"]) == {"eager", "fusedres", "eager float64"}
    assert len(numerics["losses"]["fusedres"]) == 2
    assert (tmp_path / "numerics.png").stat().st_size > 1000 and (tmp_path / "speedup.png").exists()
