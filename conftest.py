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
