"""Markers and skips shared by the whole suite."""

import shutil

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slurm: needs a running Slurm cluster (skipped without one)")


def _have_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - any import failure means no usable CUDA
        return False


def _have_slurm() -> bool:
    if not shutil.which("sinfo"):
        return False
    import subprocess

    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pytest_collection_modifyitems(config, items):
    gpu_skip = None if _have_cuda() else pytest.mark.skip(reason="no CUDA GPU on this machine (torch.cuda.is_available() is False)")
    slurm_marked = [i for i in items if i.get_closest_marker("slurm")]
    slurm_skip = None
    if slurm_marked and not _have_slurm():
        slurm_skip = pytest.mark.skip(reason="no Slurm cluster answers `sinfo` (start one with slurm/local/up.sh)")
    for item in items:
        # get_closest_marker, not item.keywords: the tests/slurm folder name is a keyword too.
        if gpu_skip is not None and item.get_closest_marker("gpu"):
            item.add_marker(gpu_skip)
        if slurm_skip is not None and item.get_closest_marker("slurm"):
            item.add_marker(slurm_skip)


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """An `sbatch` first on PATH that records each call's arguments, one line per call, in the file
    it returns and prints the call's number (1, 2, ...) as the job id; nothing is submitted."""
    import os

    calls = tmp_path / "sbatch-calls"
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {calls}\nwc -l < {calls} | tr -d " "\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return calls
