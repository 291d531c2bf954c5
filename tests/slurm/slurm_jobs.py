"""Submitting jobs to a (local) Slurm cluster from tests and waiting for them with a deadline.

There is no accounting database on the local cluster (slurm/local/up.sh), so `sacct` has nothing
to say; finished jobs stay visible to `scontrol show job` for MinJobAge (600 s), which is polled.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from olmoe_megatron.launcher.slurm_render import default_slurm_dir

SLURM_DIR = default_slurm_dir()
TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
)
POLL_S = 0.5


def job_environment(**extra: str) -> dict[str, str]:
    """The submitting environment for test jobs: this interpreter's venv on the nodes, CPU ranks,
    a health check that imports torch only (the full one costs seconds per node on 2 cores)."""
    env = dict(os.environ)
    env.update(
        OLMOE_SLURM_DIR=str(SLURM_DIR),
        OLMOE_VENV=sys.prefix,
        OLMOE_PYTHON=sys.executable,
        OLMOE_NPROC_PER_NODE="2",
        OLMOE_HEALTH_IMPORTS="torch",
        OLMOE_RDZV_TIMEOUT="60",
    )
    env.update(extra)
    return env


def sbatch(options: list[str], script: Path, args: list[str], *, env: dict[str, str], cwd: Path) -> str:
    """Submits `script args` with sbatch `options`; returns the job id."""
    # Overrides of the templates' GPU-cluster defaults: no GPUs, 2 CPUs per node, 5 minutes, and
    # SIGUSR1 10 s before the limit (the default 180 s before a short limit would come at once).
    defaults = ["--gpus-per-node=0", "--cpus-per-task=2", "--time=5", "--signal=USR1@10"]
    cmd = ["sbatch", "--parsable", *defaults, *options, str(script), *args]
    result = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed: {' '.join(cmd)}\n{result.stderr}")
    return result.stdout.strip().split(";")[0]


def job_records(job_id: str) -> list[dict[str, str]]:
    """`scontrol show job -o` as dicts, one per job (one per array task for an array job)."""
    result = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    records = []
    for line in result.stdout.splitlines():
        fields = {}
        for token in line.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        if fields:
            records.append(fields)
    return records


def wait_for_job(job_id: str, *, timeout_s: float, log: Path | None = None, restarts: int = 0) -> list[dict[str, str]]:
    """Polls until every record of `job_id` is in a terminal state (and, with `restarts`, has been
    requeued that many times); cancels the job and raises with the log tail at the deadline."""
    deadline = time.monotonic() + timeout_s
    records: list[dict[str, str]] = []
    while time.monotonic() < deadline:
        records = job_records(job_id)
        if records and all(
            r.get("JobState") in TERMINAL_STATES and int(r.get("Restarts", "0")) >= restarts for r in records
        ):
            return records
        time.sleep(POLL_S)
    subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
    tail = log.read_text()[-4000:] if log is not None and log.exists() else "(no log)"
    states = [(r.get("JobId"), r.get("JobState"), r.get("Restarts")) for r in records]
    raise AssertionError(f"job {job_id} not finished after {timeout_s}s: {states}\n--- log tail ---\n{tail}")


def wait_for_file(path: Path, *, timeout_s: float, job_id: str) -> None:
    """Polls for `path` (written by a job when it reaches some point); fails at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return
        states = [r.get("JobState") for r in job_records(job_id)]
        if states and all(state in TERMINAL_STATES for state in states):
            raise AssertionError(f"job {job_id} ended ({states}) before writing {path}")
        time.sleep(POLL_S)
    subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
    raise AssertionError(f"job {job_id} did not write {path} within {timeout_s}s")
