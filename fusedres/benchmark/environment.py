"""Where a result came from: device, driver, library versions and the git commit, carried on every row."""
from __future__ import annotations

import datetime
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


def collect(device: torch.device) -> dict:
    import triton

    import fusedres

    here = pathlib.Path(__file__).resolve().parent
    on_gpu = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if on_gpu else f"CPU ({platform.processor() or 'unknown'})",
        "driver": (_run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader").splitlines() or [""])[0]
        if on_gpu and shutil.which("nvidia-smi") else "",
        "cuda": torch.version.cuda or "",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cudnn": str(torch.backends.cudnn.version()) if on_gpu else "",
        "fusedres": fusedres.__version__,
        "git_commit": _run("git", "rev-parse", "--short=12", "HEAD", cwd=here) or "unknown",
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
