"""The trainer on the local two-node cluster, submitted with `olmoe slurm submit`:

1. olmoe_tiny on 2 nodes x 2 processes completes and its losses equal a local torchrun run;
2. `scancel --signal=USR1` mid-run -> checkpoint, exit 75 -> requeue -> resume -> the same losses;
3. a sweep over three layouts completes and `olmoe sweep report` tabulates it;
4. a study with shared initial weights as one init job and one array depending on it
   (`olmoe study submit`): the expert-parallel member's losses equal the data-parallel one's.

The contract with the trainer these tests rely on: `olmoe train --recipe NAME --train.max_steps=N
--checkpoint.dir=DIR --metrics.jsonl=PATH` runs as one rank of a torch.distributed job (RANK,
WORLD_SIZE, MASTER_ADDR... set by torchrun or slurm/entrypoint.sh); rank 0 appends one JSON object
per step to PATH with `step` and `lm_loss` (and `tokens_per_s`, `mfu`, `peak_mem_bytes`, `layout`);
it resumes from the latest checkpoint in DIR; on SIGUSR1 it finishes the step, saves, and exits 75
once the checkpoint is committed on every rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_jobs import job_records, wait_for_job

OLMOE = str(Path(sys.prefix) / "bin" / "olmoe")
# Long enough for SIGUSR1 to land mid-run on 2 shared cores; raise it if test 2 reports a run that
# finished before the signal.
NUM_STEPS = int(os.environ.get("OLMOE_SLURM_TEST_STEPS", "20"))


def _trainer_missing() -> str | None:
    try:
        result = subprocess.run([OLMOE, "train", "--help"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`olmoe train --help` did not run: {exc}"
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return f"the trainer is not there yet: `olmoe train --help` exits {result.returncode} ({last})"
    return None


_MISSING = _trainer_missing()
# sbatch passes the submitting environment on. The trainer imports megatron.core and olmoe_megatron
# itself, so the health check need not import them first (it does in test_slurm_cluster.py).
_SUBMIT_ENV = {**os.environ, "OLMOE_HEALTH_IMPORTS": "torch"}
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")]


def _train_args(tmp: Path, name: str, num_steps: int = NUM_STEPS) -> list[str]:
    return [
        "--recipe", "olmoe_tiny", f"--train.max_steps={num_steps}",
        f"--checkpoint.dir={tmp / name / 'ckpt'}", f"--metrics.jsonl={tmp / name / 'metrics.jsonl'}",
    ]


def _losses(path: Path) -> dict[int, float]:
    """step -> lm_loss; for a step logged twice (before and after a resume), the last record."""
    losses = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if "lm_loss" in record:
                losses[int(record["step"])] = float(record["lm_loss"])
    return losses


def _submit(tmp: Path, name: str, extra: list[str], *, train_args: list[str]) -> tuple[str, Path]:
    log_dir = tmp / name / "logs"
    cmd = [OLMOE, "slurm", "submit", "--recipe", "olmoe_tiny", "--nodes", "2", "--gpus-per-node", "0",
           "--nproc-per-node", "2", "--cpus-per-task", "2", "--time", "10", "--signal-seconds", "10",
           "--job-name", name, "--log-dir", str(log_dir), *extra, *train_args[2:]]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_SUBMIT_ENV)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().splitlines()[-1]
    return job_id, log_dir


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory) -> dict[int, float]:
    """The same run with a local torchrun: 4 processes on this machine, no Slurm."""
    tmp = tmp_path_factory.mktemp("reference")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "--no-python",
           OLMOE, "train", *_train_args(tmp, "local")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    losses = _losses(tmp / "local" / "metrics.jsonl")
    assert sorted(losses) == list(range(1, NUM_STEPS + 1))
    return losses


def test_olmoe_tiny_on_two_nodes_equals_local_torchrun(tmp_path, reference_losses):
    job_id, log_dir = _submit(tmp_path, "tiny2x2", [], train_args=_train_args(tmp_path, "tiny2x2"))
    [record] = wait_for_job(job_id, timeout_s=240, log=log_dir / f"tiny2x2-{job_id}.out")
    assert record["JobState"] == "COMPLETED", (log_dir / f"tiny2x2-{job_id}.out").read_text()[-4000:]
    # Same world size, same rank placement (node 0 holds ranks 0-1), one thread per rank: bitwise.
    assert _losses(tmp_path / "tiny2x2" / "metrics.jsonl") == reference_losses


def test_usr1_requeue_resumes_with_identical_losses(tmp_path, reference_losses):
    job_id, log_dir = _submit(tmp_path, "preempt", ["--requeue"], train_args=_train_args(tmp_path, "preempt"))
    log = log_dir / f"preempt-{job_id}.out"
    metrics = tmp_path / "preempt" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(_losses(metrics)) >= 2):
        states = [r.get("JobState") for r in job_records(job_id)]
        assert time.monotonic() < deadline and "FAILED" not in states and "COMPLETED" not in states, (states, log.read_text()[-4000:] if log.exists() else "")
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True, timeout=30)
    [record] = wait_for_job(job_id, timeout_s=300, log=log, restarts=1)
    text = log.read_text()
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", text[-4000:]
    assert "requeueing job" in text
    losses = _losses(metrics)
    assert max(losses) == NUM_STEPS, f"run ended at step {max(losses)}"
    assert losses == {step: reference_losses[step] for step in losses}
    assert set(losses) == set(range(1, NUM_STEPS + 1))


def test_sweep_over_three_layouts_and_report(tmp_path):
    sweep = tmp_path / "layouts.txt"
    sweep.write_text(
        "--parallel.expert_parallel=1\n"
        "--parallel.expert_parallel=2\n"
        "--parallel.tensor_parallel=2 --parallel.sequence_parallel=true\n"
    )
    metrics_dir = tmp_path / "sweep"
    # One CPU per task: all three array tasks fit on the two emulated nodes at once.
    cmd = [OLMOE, "slurm", "submit", "--recipe", "olmoe_tiny", "--nodes", "1", "--gpus-per-node", "0",
           "--nproc-per-node", "2", "--cpus-per-task", "1", "--time", "10", "--signal-seconds", "10",
           "--job-name", "sweep", "--log-dir", str(tmp_path / "logs"), "--sweep", str(sweep),
           "--train.max_steps=4", f"--checkpoint.dir={tmp_path}/ckpt/{{task}}",
           f"--metrics.jsonl={metrics_dir}/{{task}}.jsonl"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_SUBMIT_ENV)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().splitlines()[-1]
    records = wait_for_job(job_id, timeout_s=240, log=tmp_path / "logs" / f"sweep-{job_id}_0.out")
    assert sorted(r["JobState"] for r in records) == ["COMPLETED"] * 3, records

    report = subprocess.run([OLMOE, "sweep", "report", str(metrics_dir), "--format", "json"],
                            capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    rows = json.loads(report.stdout)
    assert len(rows) == 3, rows
    for row in rows:
        assert row["num_steps"] == 4 and row["tokens_per_s"] > 0 and row["peak_mem_bytes"] > 0, row


STUDY = """
name: slurm_layouts
steps: 3
fit_schedule: false
same_init: true
launch: {nproc: 2}
overrides: {precision.dtype: fp32, train.micro_batch_size: 1}
members:
  - {name: dp2, recipe: olmoe_tiny}
  - {name: ep2, recipe: olmoe_tiny, overrides: {parallel.expert_parallel: 2}}
"""


def test_study_with_shared_init_as_a_slurm_array(tmp_path):
    study_file, study_dir = tmp_path / "layouts.yaml", tmp_path / "study"
    study_file.write_text(STUDY)
    cmd = [OLMOE, "study", "submit", str(study_file), "--dir", str(study_dir), "--nodes", "1", "--gpus-per-node", "0",
           "--nproc-per-node", "2", "--cpus-per-task", "1", "--time", "10"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_SUBMIT_ENV)
    assert result.returncode == 0, result.stderr
    init_id, array_id = result.stdout.split()
    assert f"after job {init_id}" in result.stderr
    init = wait_for_job(init_id, timeout_s=300, log=next(iter((study_dir / "slurm").glob("*-init-*.out")), None))
    assert [r["JobState"] for r in init] == ["COMPLETED"], init
    assert (study_dir / "init" / "seed1234" / "study_init.json").is_file()
    records = wait_for_job(array_id, timeout_s=420, log=study_dir / "slurm" / f"study-slurm_layouts-{array_id}_0.out")
    assert sorted(r["JobState"] for r in records) == ["COMPLETED"] * 2, records
    for name in ("dp2", "ep2"):
        assert json.loads((study_dir / "members" / name / "done.json").read_text())["exit_code"] == 0
    dp2, ep2 = (_losses(study_dir / "members" / n / "metrics.jsonl") for n in ("dp2", "ep2"))
    assert sorted(dp2) == [1, 2, 3] and max(abs(dp2[s] - ep2[s]) for s in dp2) < 1e-5, (dp2, ep2)
    status = subprocess.run([OLMOE, "study", "status", str(study_dir)], capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and status.stdout.count("finished") == 2, status.stdout
