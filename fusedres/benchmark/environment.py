"""Where a result came from: device, driver, library versions and the git commit, carried on every row."""
from __future__ import annotations

import datetime
import os
import pathlib
import platform
import shutil
import subprocess

import torch


def _run(*command: str, cwd=None) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=cwd)
        return done.stdout.strip() if done.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the platform tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_name() -> str:
    """The CPU's model and the cores this process may use. platform.processor() is empty on Linux, hence
    /proc/cpuinfo first (its "model name"; "Model" on some ARM boards), then sysctl on macOS."""
    name = ""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model") and value.strip():
                name = value.strip()
                break
    except OSError:
        pass
    if not name and platform.system() == "Darwin":
        name = _run("sysctl", "-n", "machdep.cpu.brand_string")
    name = name or platform.processor() or platform.machine() or "unknown"
    return f"{name}, {usable_cores()} cores"


def git_commit(where: pathlib.Path) -> str:
    """The commit measured: ``FUSEDRES_COMMIT`` when set (bench/gpu_check.sh sets it, ``-dirty`` included, also in a
    copy without .git), else git's HEAD."""
    return os.environ.get("FUSEDRES_COMMIT") or _run("git", "rev-parse", "--short=12", "HEAD", cwd=where) or "unknown"


def collect(device: torch.device) -> dict:
    import triton

    import fusedres

    here = pathlib.Path(__file__).resolve().parent
    on_gpu = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if on_gpu else f"CPU ({cpu_name()})",
        "driver": (_run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader").splitlines() or [""])[0]
        if on_gpu and shutil.which("nvidia-smi") else "",
        "cuda": torch.version.cuda or "",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cudnn": str(torch.backends.cudnn.version()) if on_gpu else "",
        "fusedres": fusedres.__version__,
        "git_commit": git_commit(here),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
