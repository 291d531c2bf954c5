"""Real jobs on the local two-node cluster (slurm/local/up.sh): slurm/train.sbatch ->
slurm/entrypoint.sh -> torchrun or one task per rank, over gloo, with tiny scripts instead of the
trainer. Every wait has a deadline; a job that misses it is cancelled and its log shown."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from olmoe_megatron.launcher.slurm_render import SlurmJobConfig, render_sbatch
from slurm_jobs import SLURM_DIR, job_environment, sbatch, wait_for_file, wait_for_job

pytestmark = pytest.mark.slurm

ALL_REDUCE = """
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
print(f"rank {dist.get_rank()}/{dist.get_world_size()} node {os.environ['SLURMD_NODENAME']} sum {t.item()}", flush=True)
dist.destroy_process_group()
"""

CRASH = """
import torch, torch.distributed as dist
dist.init_process_group("gloo")
if dist.get_rank() == 3:
    raise RuntimeError("rank 3 fails on purpose")
t = torch.ones(1)
dist.all_reduce(t)  # the other ranks block here until the job is torn down
"""

# A rank that hangs (never reaches the collective): the others give up after the configured
# collective timeout of the trainer's process-group set-up, so the job ends instead of waiting forever.
HANG = """
import time, torch, torch.distributed as dist
from olmoe_megatron.parallel.context import init_distributed
init_distributed(backend="gloo", timeout_minutes=0.2)
if dist.get_rank() == 3:
    print("rank 3 hangs on purpose", flush=True)
    time.sleep(3600)
dist.all_reduce(torch.ones(1))
"""

# Stands in for the trainer's preemption contract: on SIGUSR1 every rank agrees to stop, "saves",
# and exits 75; the requeued run (SLURM_RESTART_COUNT=1) "resumes" and finishes.
PREEMPTIBLE = """
import os, signal, sys, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
rank, restart = dist.get_rank(), int(os.environ.get("SLURM_RESTART_COUNT", "0"))
out = sys.argv[1]
if restart > 0:
    print(f"rank {rank} resumed after {restart} requeue(s)", flush=True)
    open(f"{out}/resumed.{rank}", "w").close()
    dist.destroy_process_group()
    sys.exit(0)
stop = False
def on_usr1(signum, frame):
    global stop
    stop = True
signal.signal(signal.SIGUSR1, on_usr1)
dist.barrier()
if rank == 0:
    open(f"{out}/ready", "w").close()
while True:
    flag = torch.tensor([1.0 if stop else 0.0])
    dist.all_reduce(flag)  # every rank stops at the same step
    if flag.item() > 0:
        break
    time.sleep(0.2)
dist.barrier()
print(f"rank {rank} saved its checkpoint, exiting 75", flush=True)
dist.destroy_process_group()
sys.exit(75)
"""

ECHO_ARGS = """
import json, os, sys
out = sys.argv[1]
with open(os.path.join(out, f"task{os.environ['SLURM_ARRAY_TASK_ID']}.rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(sys.argv[2:], f)
"""


def _script(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def _submit_train(tmp_path: Path, options: list[str], command: list[str], **env: str) -> tuple[str, Path]:
    job_id = sbatch(
        [*options, f"--output={tmp_path}/job-%j.out"], SLURM_DIR / "train.sbatch", command,
        env=job_environment(**env), cwd=tmp_path,
    )
    return job_id, tmp_path / f"job-{job_id}.out"


def test_torchrun_over_two_nodes_all_reduces(tmp_path):
    script = _script(tmp_path, "all_reduce.py", ALL_REDUCE)
    # The full default health check here (torch, megatron.core, olmoe_megatron must import).
    job_id, log = _submit_train(tmp_path, ["--nodes=2"], [sys.executable, str(script)],
                                OLMOE_HEALTH_IMPORTS="torch megatron.core olmoe_megatron")
    [record] = wait_for_job(job_id, timeout_s=120, log=log)
    text = log.read_text()
    assert record["JobState"] == "COMPLETED", text
    results = re.findall(r"rank (\d)/4 node (n\d) sum 10.0", text)
    assert sorted(rank for rank, _ in results) == ["0", "1", "2", "3"], text
    assert sorted(node for _, node in results) == ["n1", "n1", "n2", "n2"], text


def test_rendered_script_with_one_task_per_rank_all_reduces(tmp_path):
    # The script `olmoe slurm submit` writes, as sbatch receives it: header, exports, body.
    script = _script(tmp_path, "all_reduce.py", ALL_REDUCE)
    job = SlurmJobConfig(nodes=2, gpus_per_node=0, nproc_per_node=2, cpus_per_task=1, time="5",
                         signal_seconds=10, log_dir=str(tmp_path), launch="srun", job_name="rendered")
    rendered = tmp_path / "rendered.sbatch"
    rendered.write_text(render_sbatch(job, command=[sys.executable, str(script)], slurm_dir=SLURM_DIR, venv=sys.prefix))
    result = subprocess.run(["sbatch", "--parsable", str(rendered)], env=job_environment(), cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().split(";")[0]
    log = tmp_path / f"rendered-{job_id}.out"
    [record] = wait_for_job(job_id, timeout_s=120, log=log)
    text = log.read_text()
    assert record["JobState"] == "COMPLETED", text
    # srun places tasks in blocks: ranks 0-1 on the first node, 2-3 on the second.
    assert sorted(re.findall(r"rank (\d)/4 node (n\d) sum 10.0", text)) == [
        ("0", "n1"), ("1", "n1"), ("2", "n2"), ("3", "n2")
    ], text


def test_a_crashing_rank_fails_the_job_and_is_named(tmp_path):
    script = _script(tmp_path, "crash.py", CRASH)
    job_id, log = _submit_train(tmp_path, ["--nodes=2"], [sys.executable, str(script)])
    [record] = wait_for_job(job_id, timeout_s=90, log=log)
    text = log.read_text()
    assert record["JobState"] == "FAILED", text
    assert record["ExitCode"] != "0:0"
    assert re.search(r"node n[12]: rank 3 \(local rank [01]\) exited with code 1", text), text
    assert "rank 3 fails on purpose" in text


def test_a_hanging_rank_fails_the_job_within_the_collective_timeout(tmp_path):
    import time

    script = _script(tmp_path, "hang.py", HANG)
    started = time.monotonic()
    job_id, log = _submit_train(tmp_path, ["--nodes=2"], [sys.executable, str(script)])
    [record] = wait_for_job(job_id, timeout_s=120, log=log)
    text = log.read_text()
    assert record["JobState"] == "FAILED", text
    assert "rank 3 hangs on purpose" in text
    assert time.monotonic() - started < 100, "the job outlived the 12 s collective timeout by far"


def test_usr1_requeues_the_job_and_it_resumes(tmp_path):
    import subprocess
    script = _script(tmp_path, "preemptible.py", PREEMPTIBLE)
    job_id, log = _submit_train(tmp_path, ["--nodes=2", "--requeue"], [sys.executable, str(script), str(tmp_path)])
    wait_for_file(tmp_path / "ready", timeout_s=90, job_id=job_id)
    # As Slurm does before the time limit (--signal=USR1@N): every process of the step gets it.
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True, timeout=30)
    [record] = wait_for_job(job_id, timeout_s=120, log=log, restarts=1)
    text = log.read_text()
    assert record["JobState"] == "COMPLETED", text
    assert record["Restarts"] == "1", text
    assert "requeueing job" in text
    assert sorted(p.name for p in tmp_path.glob("resumed.*")) == ["resumed.0", "resumed.1", "resumed.2", "resumed.3"]


def test_array_sweep_runs_one_task_per_entry(tmp_path):
    script = _script(tmp_path, "echo_args.py", ECHO_ARGS)
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# three layouts\n--layout=a\n\n--layout=b --extra={task}\n--layout=$(touch PWNED) `touch PWNED2`\n")
    job_id = sbatch(
        ["--array=0-2", "--nodes=1", "--cpus-per-task=1", f"--output={tmp_path}/sweep-%A_%a.out"],
        SLURM_DIR / "sweep.sbatch", [str(sweep), sys.executable, str(script), str(tmp_path)],
        env=job_environment(OLMOE_NPROC_PER_NODE="1"), cwd=tmp_path,
    )
    records = wait_for_job(job_id, timeout_s=120, log=tmp_path / f"sweep-{job_id}_0.out")
    assert sorted(r["JobState"] for r in records) == ["COMPLETED"] * 3, records
    got = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("task*.json")}
    assert got == {
        "task0.rank0.json": ["--layout=a"],
        "task1.rank0.json": ["--layout=b", "--extra=1"],
        "task2.rank0.json": ["--layout=$(touch", "PWNED)", "`touch", "PWNED2`"],
    }
    assert not list(tmp_path.glob("PWNED*"))
