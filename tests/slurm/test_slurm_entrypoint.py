"""slurm/entrypoint.sh and the torchrun wrapper without a cluster: the Slurm variables a job step
would have, and a `scontrol` on PATH that resolves host names and records requeues."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from olmoe_megatron.launcher.slurm_render import default_slurm_dir
from olmoe_megatron.launcher.slurm_torchrun import exit_code_for
from olmoe_megatron.training.exit_codes import EXIT_REQUEUE

ENTRYPOINT = default_slurm_dir() / "entrypoint.sh"

# Prints the variables a rank sees, then exits with the code given as its argument.
RANK_SCRIPT = """import json, os, sys
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
        "GLOO_SOCKET_IFNAME", "CUDA_DEVICE_MAX_CONNECTIONS", "OMP_NUM_THREADS"]
print("ENV " + json.dumps({k: os.environ.get(k) for k in keys}), flush=True)
sys.exit(int(sys.argv[1]))
"""


def _run_entrypoint(tmp_path: Path, exit_code: int, *, procid: int = 0, env: dict[str, str] | None = None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    requeues = tmp_path / "requeues"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(
        "#!/usr/bin/env bash\n"
        'if [[ $1 == show && $2 == hostnames ]]; then printf "n1\\nn2\\n"; exit 0; fi\n'
        f'if [[ $1 == requeue ]]; then echo "$2" >> {shlex.quote(str(requeues))}; exit 0; fi\n'
        "exit 1\n"
    )
    scontrol.chmod(0o755)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    step_env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_STEP_NUM_NODES": "2",
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_NTASKS": "4",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(procid % 2),
        "SLURM_NODEID": str(procid // 2),
        "SLURMD_NODENAME": f"n{procid // 2 + 1}",
        "SLURM_CPUS_PER_TASK": "1",
        "OLMOE_HEALTH": "0",
        **(env or {}),
    }
    result = subprocess.run(
        ["bash", str(ENTRYPOINT), sys.executable, str(script), str(exit_code)],
        env=step_env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    requeued = requeues.read_text().split() if requeues.exists() else []
    return result, requeued


def _rank_env(result) -> dict:
    import json

    line = next(line for line in result.stdout.splitlines() if line.startswith("ENV "))
    return json.loads(line[4:])


def test_srun_mode_sets_the_torch_distributed_environment_from_slurm(tmp_path):
    result, requeued = _run_entrypoint(tmp_path, 0, procid=3, env={"GLOO_SOCKET_IFNAME": "lo"})
    assert result.returncode == 0, result.stderr
    assert _rank_env(result) == {
        "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "n1", "MASTER_PORT": str(15000 + 4242 % 15000),
        "GLOO_SOCKET_IFNAME": "lo", "CUDA_DEVICE_MAX_CONNECTIONS": "1", "OMP_NUM_THREADS": "1",
    }
    assert requeued == []


def test_leader_requeues_the_job_when_the_trainer_exits_75(tmp_path):
    result, requeued = _run_entrypoint(tmp_path, EXIT_REQUEUE, procid=0)
    assert result.returncode == EXIT_REQUEUE
    assert requeued == ["4242"]
    assert "requeueing job 4242" in result.stderr


def test_other_ranks_leave_the_requeue_to_the_leader_and_exit_0(tmp_path):
    # Exit 0, so srun --kill-on-bad-exit does not cut the leader short while it requeues.
    result, requeued = _run_entrypoint(tmp_path, EXIT_REQUEUE, procid=2)
    assert result.returncode == 0
    assert requeued == []


def test_requeue_can_be_switched_off(tmp_path):
    result, requeued = _run_entrypoint(tmp_path, EXIT_REQUEUE, env={"OLMOE_REQUEUE": "0"})
    assert result.returncode == EXIT_REQUEUE
    assert requeued == []


def test_a_failing_rank_is_named_with_its_node_and_code(tmp_path):
    result, requeued = _run_entrypoint(tmp_path, 7, procid=3)
    assert result.returncode == 7
    assert "rank 3 (local rank 1) on node n2 exited with code 7" in result.stderr
    assert requeued == []


def test_health_check_names_the_node_and_fails_fast(tmp_path):
    result, _ = _run_entrypoint(tmp_path, 0, procid=2, env={"OLMOE_HEALTH": "1", "OLMOE_HEALTH_IMPORTS": "no_such_module_xyz"})
    assert result.returncode == 3
    assert "[entrypoint n2 node 1 task 2] error: health check" in result.stderr
    assert "ENV " not in result.stdout, "the command must not start on an unhealthy node"


def test_health_check_refuses_a_full_disk(tmp_path):
    result, _ = _run_entrypoint(
        tmp_path, 0, env={"OLMOE_HEALTH": "1", "OLMOE_HEALTH_IMPORTS": "json", "OLMOE_HEALTH_MIN_FREE_GB": "100000000"}
    )
    assert result.returncode == 3
    assert "GB free" in result.stderr


def test_torchrun_mode_needs_a_rank_count_on_cpu(tmp_path):
    env = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1"}
    result, _ = _run_entrypoint(tmp_path, 0, env=env)
    assert result.returncode == 2
    assert "set OLMOE_NPROC_PER_NODE" in result.stderr


@pytest.mark.parametrize(
    "codes, expected",
    [
        ({0: EXIT_REQUEUE, 1: EXIT_REQUEUE}, EXIT_REQUEUE),
        ({2: -15, 3: 1}, 1),  # rank 3 crashed, the agent then stopped rank 2 with SIGTERM
        ({0: -9}, 128 + 9),
        ({0: EXIT_REQUEUE, 1: 1}, 1),
        ({2: -15, 3: EXIT_REQUEUE}, EXIT_REQUEUE),  # rank 3 exited 75 first, the agent stopped rank 2
    ],
)
def test_torchrun_wrapper_passes_the_cause_through(codes, expected):
    failures = {rank: SimpleNamespace(exitcode=code, timestamp=100) for rank, code in codes.items()}
    assert exit_code_for(failures) == expected
