"""bench/gpu_check.sh, the prepared GPU run, without a GPU: a dry run cut short by its deadline still leaves the
archive and summary.txt (at most 8 files, as the GPU machine sends back), naming the steps that finished and those
that did not; the headlines read pytest's and the benchmark's results; unpack files an archive under
bench/results/<label>/ and writes the measured-against-predicted tables. (CI runs the full dry run itself.)"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gpu_check = sys.modules.setdefault("gpu_check", importlib.util.module_from_spec(spec))
spec.loader.exec_module(gpu_check)


@pytest.mark.full
def test_a_dry_run_cut_short_by_its_deadline_leaves_the_archive_and_the_summary(tmp_path):
    """(--full: the dry run's processes, 15-20 s; CI also runs the whole dry run.)"""
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--deadline", "40", "--out",
                           str(tmp_path)], env=dict(env, PYTHON=sys.executable), capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 3, "steps were left out for time: incomplete, not passed\n" + done.stdout[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [gpu_check.ARCHIVE, gpu_check.SUMMARY]
    summary = (tmp_path / gpu_check.SUMMARY).read_text()
    assert "DRY RUN" in summary and "deadline 40 s" in summary and "exit status 3" in summary
    lines = {line.split()[0]: line for line in summary.splitlines() if line.split() and
             line.split()[0] in {step.name for step in gpu_check.STEPS}}
    assert list(lines) == [step.name for step in gpu_check.STEPS], summary
    assert " ok " in lines["preflight"]
    assert "no time left" in lines["numerics"] and "skipped" in lines["numerics"], summary
    with tarfile.open(tmp_path / gpu_check.ARCHIVE) as archive:
        names = archive.getnames()
    label = names[0].split("/")[0]
    assert label.startswith("dry-run-cpu-")
    assert f"{label}/{gpu_check.SUMMARY}" in names and f"{label}/preflight.log" in names


def test_pytest_headline_counts_and_names_failures():
    log = ("F.s\nFAILED tests/test_merges.py::test_x[nchw] - AssertionError: NaN\n"
           "=========== 1 failed, 1 passed, 1 skipped in 3.20s ===========\n")
    headline = gpu_check._pytest_headline(None, None, log)
    assert headline == "1 failed, 1 passed, 1 skipped; failed: tests/test_merges.py::test_x[nchw]"
    assert "cut short" in gpu_check._pytest_headline(None, None, "....")


def _kernel_row(ms, predicted):
    return dict(level="kernel", op="batch_norm_relu", mode="inference", shape="128x64x56x56", dtype="bfloat16",
                layout="channels_last", provider="fusedres", ms=ms, predicted_ms_h200=0.1,
                predicted_ms_measured_copy_bw=predicted, measured_over_predicted=ms / predicted)


def test_bench_headline_and_the_notes_tables_read_the_results(tmp_path):
    work = tmp_path / "NVIDIA-H200-2026-12-01"
    (work / "kernels-bf16").mkdir(parents=True)
    (work / "kernels-bf16" / "results.json").write_text(json.dumps({"rows": [_kernel_row(0.2, 0.1),
                                                                             _kernel_row(0.3, 0.1)]}))
    (work / "ops-bf16").mkdir()
    rows = [dict(level="op", op="add_relu", mode="inference", shape="128x256x56x56", dtype="bfloat16",
                 layout="channels_last", provider=provider, ms=ms, speedup_vs_eager=speedup, pct_copy_bw=pct)
            for provider, ms, speedup, pct in (("eager", 0.5, None, 40.0), ("fusedres", 0.25, 2.0, 80.0))]
    (work / "ops-bf16" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # a run killed hard
    run = gpu_check.Run(python=sys.executable, dry_run=False, work=work, cores=2)
    step = gpu_check.Step("kernels-bf16", 1, 1, lambda run: None, gpu_check._bench_headline)
    assert gpu_check._bench_headline(run, step, "") == "2 rows; measured/predicted, median 2.50"
    step.name = "ops-bf16"
    assert gpu_check._bench_headline(run, step, "") == ("2 rows; fusedres/eager speedup, median 2.00; % of copy "
                                                        "BW, median 80")
    archive = tmp_path / "out" / gpu_check.ARCHIVE
    archive.parent.mkdir()
    (work / gpu_check.SUMMARY).write_text("fusedres gpu_check · NVIDIA-H200-2026-12-01\n")
    with tarfile.open(archive, "w:gz") as packed:
        packed.add(work, arcname=work.name)
    into = tmp_path / "results"
    assert gpu_check.main(["unpack", str(archive), "--into", str(into)]) == 0
    tables = (into / work.name / "measured-against-predicted.md").read_text()
    assert "| batch_norm_relu | inference | 128x64x56x56 | bfloat16 | channels_last | 0.100 | 0.100 | 0.200 | 2.00 |" \
        in tables
    assert "| add_relu | inference | 128x256x56x56 | bfloat16 | channels_last | 0.250 | 2.00 |  | 80 |" in tables
    with pytest.raises(SystemExit, match="exists"):
        gpu_check.main(["unpack", str(archive), "--into", str(into)])


def test_unpack_refuses_an_archive_reaching_outside_its_folder(tmp_path):
    outside = tmp_path / "evil.txt"
    outside.write_text("x")
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as packed:
        packed.add(outside, arcname="label/../../evil.txt")
    with pytest.raises(SystemExit, match="unsafe"):
        gpu_check.main(["unpack", str(archive), "--into", str(tmp_path / "results")])
