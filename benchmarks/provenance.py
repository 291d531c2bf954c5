"""What every benchmark records beside its numbers: threads, the commit, the machine, versions.

Imported by the benchmark scripts in this folder (run as `python benchmarks/NAME.py`, so this
folder is on sys.path).
"""

from __future__ import annotations

import os
import platform
import subprocess

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def set_threads() -> int:
    """Uses every core this process may run on; returns how many."""
    import torch

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads)
    return threads


def git(checkout: str, *cmd: str) -> str:
    return subprocess.run(["git", "-C", checkout, *cmd], capture_output=True, text=True).stdout


def dirty_paths(checkout: str = REPOSITORY) -> list[str]:
    """Tracked files that differ from HEAD (porcelain lines are 'XY path')."""
    return [line[3:] for line in git(checkout, "status", "--porcelain", "--untracked-files=no").splitlines() if line]


def cpu_model() -> str:
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as handle:
            return next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")),
                        platform.processor())
    return platform.processor()


def cpu_description() -> dict:
    """The CPU model, core count and torch's CPU capability (AVX2, AVX512, ...)."""
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def versions(*names: str) -> dict[str, str]:
    import importlib.metadata as md

    return {name: md.version(name) for name in names}
