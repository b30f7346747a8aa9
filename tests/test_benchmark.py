"""fusedres-bench in its CPU quick mode: the files it writes and what their rows and summary say."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from fusedres.report import kernel_report
from fusedres.benchmark import cli, environment
from fusedres.benchmark.cases import floor_bytes
from fusedres.benchmark.report import ENV_FIELDS, KERNELS_HEADING, ROW_FIELDS
from tests.helpers import FULL, INTERPRETING

pytestmark = pytest.mark.skipif(not INTERPRETING, reason="the CPU mode of the benchmark")
pytest.importorskip("matplotlib", reason="the benchmark writes a PNG plot")


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in ``text``, as rows of cells (header, separator, body)."""
    tables, table = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif table:
            tables.append(table)
            table = []
    return tables


def assert_cpu_summary(summary: str) -> None:
    """A CPU run's summary names the CPU and leaves out the columns it cannot fill."""
    assert f"CPU ({environment.cpu_name()})" in summary and "CPU (unknown" not in summary
    tables = markdown_tables(summary)
    assert tables
    for header, _, *body in tables:
        for index, heading in enumerate(header):
            assert any(row[index] for row in body), f"column {heading!r} is empty on every row"


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
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("## fusedres-bench") and KERNELS_HEADING not in summary
    assert_cpu_summary(summary)
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


@FULL
def test_blocks_models_and_numerics_quick_cpu_run(tmp_path):
    """(--full: whole models and a training run in the interpreter, 60-90 s; the quick tier's benchmark run is the
    ops suite's.)"""
    assert cli.main(["--quick", "--suite", "blocks,models,numerics", "--dtype", "fp32", "--numerics-steps", "2",
                     "--numerics-batch-size", "4", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    levels = {(r["level"], r["op"], r["mode"]) for r in rows}
    assert {("block", "seed.BasicBlock", "inference"), ("block", "torchvision.Bottleneck", "forward_backward"),
            ("model", "torchvision.resnet18", "inference"), ("model", "torchvision.resnet18", "train_step"),
            ("numerics", "seed.SmallResNet on digits", "train 2 steps")} <= levels
    for row in rows:
        if row["provider"] in ("fusedres", "fusedres (save_memory)"):
            assert row["ms"] is None and row["max_abs_error"] is not None
            assert row["max_abs_error"] < (1e-2 if row["level"] != "numerics" else 1e-1), row
        elif row["level"] != "numerics":
            assert row["ms"] > 0 and row["gbps"] is None, "GB/s is defined for ops only"
    # the models suite's training step: what the forward keeps, measured for every provider
    kept = {r["provider"]: r["retained_mb"] for r in rows if r["level"] == "model" and r["mode"] == "train_step"}
    assert set(kept) == {"eager", "fusedres", "fusedres (save_memory)"} and all(v > 0 for v in kept.values())
    assert kept["fusedres (save_memory)"] < 0.8 * kept["fusedres"] <= kept["eager"]
    assert "save_memory kept MB" in (tmp_path / "summary.md").read_text()
    numerics = json.loads((tmp_path / "numerics.json").read_text())
    assert set(numerics["losses"]) == {"eager", "fusedres", "eager float64"}
    assert len(numerics["losses"]["fusedres"]) == 2
    assert (tmp_path / "numerics.png").stat().st_size > 1000 and (tmp_path / "speedup.png").exists()


@FULL
def test_kernels_suite_quick_cpu_run(tmp_path):
    """The model's prediction on ResNet-50's quick sites at batch 128: compiled for sm_90 in a child process,
    bytes counted in this one's interpreter; labelled a prediction, never timed on a CPU. (--full: the sm_90
    compilation, 40-60 s.)"""
    assert cli.main(["--quick", "--suite", "kernels", "--dtype", "fp32", "--layout", "channels_last",
                     "--out", str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert KERNELS_HEADING in summary and "not a measurement" in KERNELS_HEADING
    assert_cpu_summary(summary)
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert {(r["op"], r["mode"]) for r in rows} == set(kernel_report.OP_MODES)
    # quick sites: two followed by a ReLU (its modes, save_memory's recompute included), two by the add (4 + 2)
    assert len(rows) == 2 * len(kernel_report.MODES["batch_norm_relu"]) + 2 * (4 + 2)
    for row in rows:
        assert row["level"] == "kernel" and row["source"] == "prediction" and row["provider"] == "fusedres"
        assert row["ms"] is None and row["timer"] is None, "a CPU run never times the kernels"
        assert "failed" not in (row["note"] or "") and "not counted" not in (row["note"] or ""), row["note"]
        assert row["launches"] == kernel_report.EXPECTED_LAUNCHES[row["mode"]], row
        assert row["registers"] > 0 and 0 < row["occupancy"] <= 1 and row["load_bits"] >= 128, row
        floor = kernel_report.FLOOR_ELEMENT_BYTES[(row["op"], row["mode"])]
        assert row["floor_element_bytes"] == floor
        assert floor <= row["counted_element_bytes"] <= 1.2 * floor, row
        numel = 1
        for size in map(int, row["shape"].split("x")):
            numel *= size
        assert row["shape"].startswith("128x") and row["counted_on"] != row["shape"]
        assert row["predicted_ms_h200"] == pytest.approx(row["counted_element_bytes"] * numel * 4 / 4800e9 * 1e3)
        assert row["predicted_ms_h100"] > row["predicted_ms_h200"]


def test_ops_suite_takes_another_activation(tmp_path):
    assert cli.main(["--quick", "--suite", "ops", "--ops", "batch_norm_add_relu,add_relu", "--modes",
                     "inference,backward", "--dtype", "fp32", "--layout", "nchw", "--activation", "silu",
                     "--providers", "eager,fusedres", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {row["op"] for row in rows} == {"batch_norm_add_silu", "add_silu"}
    for row in rows:
        if row["provider"] == "fusedres":
            assert 0 <= row["max_abs_error"] < 1e-3, row
    backward = next(r for r in rows if r["op"] == "add_silu" and r["mode"] == "backward")
    shape = tuple(int(s) for s in backward["shape"].split("x"))
    assert backward["floor_bytes"] == 4 * 4 * torch.Size(shape).numel()  # both summands read: 4e


def test_ops_suite_times_frozen_sites_on_video_shapes(tmp_path):
    """--sites r3d_18 (3-D shapes, channels_last_3d) and the frozen batch-norm's ops (eager: torchvision's
    arithmetic; floors: the eval-mode backward's)."""
    from fusedres.report.kernel_report import FLOOR_ELEMENT_BYTES

    assert cli.main(["--quick", "--suite", "ops", "--ops", "frozen_batch_norm_relu,frozen_batch_norm_add_relu",
                     "--sites", "r3d_18", "--modes", "inference,backward", "--dtype", "fp32,bf16", "--layout",
                     "channels_last", "--providers", "eager,fusedres", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {row["op"] for row in rows} == {"frozen_batch_norm_relu", "frozen_batch_norm_add_relu"}
    for row in rows:
        shape = tuple(int(s) for s in row["shape"].split("x"))
        assert len(shape) == 5, row
        if row["provider"] == "fusedres":  # (a bf16 input with fp32 buffers computes in fp32, as torchvision's)
            assert 0 <= row["max_abs_error"] < (1e-4 if row["dtype"] == "float32" else 2e-2), row
        if row["mode"] == "backward":
            floor = FLOOR_ELEMENT_BYTES[(row["op"].removeprefix("frozen_"), "eval_backward")]
            itemsize = 4 if row["dtype"] == "float32" else 2
            assert row["floor_bytes"] == floor * itemsize * torch.Size(shape).numel()


def test_a_failing_case_becomes_a_row_and_every_row_is_logged_as_measured(tmp_path, monkeypatch):
    """One case raising is that case's row (its error in the note); the others still run; rows.jsonl holds every
    row, in order, as the JSON does."""
    from fusedres.benchmark import ops_suite

    measured = ops_suite._cpu_rows

    def sometimes_failing(base, spec, settings):
        if base["mode"] == "backward":
            raise RuntimeError("the case broke")
        return measured(base, spec, settings)

    monkeypatch.setattr(ops_suite, "_cpu_rows", sometimes_failing)
    assert cli.main(["--quick", "--suite", "ops", "--ops", "add_relu", "--dtype", "fp32", "--layout", "nchw",
                     "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    failed = [r for r in rows if r["mode"] == "backward"]
    assert len(failed) == 1 and "RuntimeError: the case broke" in failed[0]["note"]
    assert {r["mode"] for r in rows} == {"inference", "train_forward", "backward", "forward_backward"}
    logged = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [(r["mode"], r["provider"]) for r in logged] == [(r["mode"], r["provider"]) for r in rows]
    assert "the case broke" in (tmp_path / "summary.md").read_text()


def test_an_interrupted_run_writes_what_it_measured(tmp_path, monkeypatch):
    """Ctrl-C, or the SIGINT/SIGTERM of a time limit, after two rows: exit status 130, and the results (JSON,
    CSV, summary, plot, rows.jsonl) hold those two rows."""
    from fusedres.benchmark import ops_suite

    measured = ops_suite._cpu_rows
    calls = []

    def interrupted_on_the_second_case(base, spec, settings):
        calls.append(base["mode"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measured(base, spec, settings)

    monkeypatch.setattr(ops_suite, "_cpu_rows", interrupted_on_the_second_case)
    assert cli.main(["--quick", "--suite", "ops", "--ops", "add_relu", "--dtype", "fp32", "--layout", "nchw",
                     "--out", str(tmp_path)]) == 130
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["mode"], r["provider"]) for r in rows] == [("inference", "eager"), ("inference", "fusedres")]
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 2
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert "interrupted" in (tmp_path / "summary.md").read_text() and (tmp_path / "speedup.png").exists()
