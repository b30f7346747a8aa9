"""Root conftest: without a GPU, run the Triton kernels in Triton's interpreter. It must be set before anything
imports triton, which is why it lives here and runs first."""
import os
import shutil
import subprocess


def _has_cuda_gpu() -> bool:
    # Asking torch would import triton first; nvidia-smi answers without importing anything.
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        return subprocess.run([smi, "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


if "TRITON_INTERPRET" not in os.environ and not _has_cuda_gpu():
    os.environ["TRITON_INTERPRET"] = "1"


# Two tiers (docs/design.md, "Tests"): `pytest` runs the quick tier, which exercises every op, mode, activation,
# dtype and layout, the contract's refusals, one ResNet's and one other model's conversion, and a benchmark run;
# `pytest --full` adds what is marked `full` (each such test says why in its docstring: whole-model matrices, the
# compilation for GPU targets, the distributed tests, the long property-based profile).
def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="fusedres: run the full tier too (every test marked `full`)")


def pytest_configure(config):
    config.addinivalue_line("markers", "full: in the --full tier only (the test's docstring says why)")
    # Read by tests that size themselves by tier (the property-based profile); xdist workers configure alike.
    os.environ["FUSEDRES_TEST_TIER"] = "full" if config.getoption("--full") else "quick"


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    quick = [item for item in items if item.get_closest_marker("full") is None]
    if len(quick) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("full")])
        items[:] = quick
