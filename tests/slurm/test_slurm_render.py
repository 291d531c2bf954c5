"""`olmoe slurm render`: the header, the world-size check, and that no user value is ever executed.

The injection tests run the rendered script itself with bash, with `srun` replaced by a recorder on
PATH: whatever the script would have run on the cluster is captured, and the files that a
successful `$(...)`, backtick or `;` injection would create must not exist.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from olmoe_megatron.config import ConfigError
from olmoe_megatron.launcher.cli import build_parser
from olmoe_megatron.launcher.commands.slurm import check_world_size, prepare
from olmoe_megatron.launcher.slurm_render import SlurmJobConfig, default_slurm_dir, render_sbatch

SLURM_DIR = default_slurm_dir()


def _args(*argv: str) -> argparse.Namespace:
    args, extra = build_parser().parse_known_args(["slurm", *argv])
    args.overrides = extra
    return args


def _cpu_job(**changes) -> SlurmJobConfig:
    return SlurmJobConfig(nodes=2, gpus_per_node=0, nproc_per_node=2, **changes)


def _run_rendered(script: str, tmp_path: Path, *, extra_env: dict[str, str] | None = None) -> list[str]:
    """Runs `script` with bash as a batch step would, with `srun` recording its argv; returns it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / "srun.argv"
    fake_srun = bin_dir / "srun"
    fake_srun.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" > {shlex.quote(str(record))}\n')
    fake_srun.chmod(0o755)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        **(extra_env or {}),
    }
    result = subprocess.run(["bash", str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return record.read_bytes().decode().split("\0")[:-1]


# ------------------------------------------------------------------------------------------------
# Header and configuration rules


def test_header_carries_every_option_once():
    job = SlurmJobConfig(
        job_name="olmoe-1b-7b", nodes=32, gpus_per_node=8, cpus_per_task=96, time="2-00:00:00",
        partition="gpu", account="ai2", qos="high", log_dir="/shared/logs", signal_seconds=300,
        container_image="nvcr.io#nvidia/pytorch:25.04-py3",
    )
    script = render_sbatch(job, command=["olmoe", "train", "--recipe", "olmoe_1b_7b"], slurm_dir=SLURM_DIR)
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert header == [
        "#SBATCH --job-name=olmoe-1b-7b",
        "#SBATCH --nodes=32",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=96",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=ai2",
        "#SBATCH --qos=high",
        "#SBATCH --output=/shared/logs/%x-%j.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR1@300",
    ]
    # The node count is written once; the body reads it back from Slurm.
    assert [line for line in script.splitlines() if "32" in line and not line.startswith("# ")] == ["#SBATCH --nodes=32"]
    assert "# world size 256: 32 node(s) x 1 torchrun starting 8 rank(s)" in script
    assert "export OLMOE_CONTAINER_IMAGE='nvcr.io#nvidia/pytorch:25.04-py3'" in script
    # The template's body follows verbatim.
    body = (SLURM_DIR / "train.sbatch").read_text().split("# ---- body:", 1)[1].split("\n", 1)[1]
    assert script.endswith(body)


def test_srun_mode_starts_one_task_per_rank_and_no_requeue_is_passed_on():
    job = SlurmJobConfig(nodes=4, gpus_per_node=8, launch="srun", requeue=False, signal_seconds=0)
    script = render_sbatch(job, command=["olmoe", "train"], slurm_dir=SLURM_DIR)
    assert "#SBATCH --ntasks-per-node=8" in script
    assert "#SBATCH --no-requeue" in script and "#SBATCH --requeue" not in script
    assert "--signal" not in script.split("# ---- body:")[0]
    assert "export OLMOE_REQUEUE=0" in script and "export OLMOE_LAUNCH=srun" in script


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(nodes=0), "slurm.nodes"),
        (dict(gpus_per_node=0), "slurm.nproc_per_node"),
        (dict(gpus_per_node=8, nproc_per_node=4), "slurm.nproc_per_node"),
        (dict(time="tomorrow"), "slurm.time"),
        (dict(signal_seconds=-1), "slurm.signal_seconds"),
    ],
)
def test_bad_job_values_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        SlurmJobConfig(**changes)


@pytest.mark.parametrize("field", ["job_name", "partition", "account", "qos", "log_dir"])
@pytest.mark.parametrize(
    "value", ["x$(touch PWNED)", "x`touch PWNED`", "x;touch PWNED", "x\ntouch PWNED", "my job", "x'y", 'x"y']
)
def test_header_values_that_need_quoting_are_rejected(field, value):
    # sbatch parses #SBATCH lines itself, without a shell: such values are refused, not quoted.
    with pytest.raises(ConfigError, match=f"slurm.{field}=.*letters, digits"):
        _cpu_job(**{field: value})


@pytest.mark.parametrize("field", ["container_image", "container_mounts", "socket_ifname"])
def test_body_values_with_a_line_break_are_rejected(field):
    with pytest.raises(ConfigError, match=f"slurm.{field}"):
        _cpu_job(**{field: "a\nb"})


# ------------------------------------------------------------------------------------------------
# Nothing a user types is executed: render, then run the script with bash


EVIL = [
    "--train.run_name=$(touch PWNED_subst)",
    "--train.run_name=`touch PWNED_backtick`",
    "--train.run_name=a; touch PWNED_semicolon",
    "--train.run_name=a\ntouch PWNED_newline",
    "--train.run_name=it's \"quoted\" $HOME ${PATH} * ? ~ & | > <",
]


def test_rendered_script_passes_hostile_arguments_through_verbatim(tmp_path):
    job = _cpu_job(container_image="img$(touch PWNED_image)`touch PWNED_image2`;x", socket_ifname="lo")
    command = ["olmoe", "train", "--recipe", "olmoe_tiny", *EVIL]
    script = render_sbatch(job, command=command, slurm_dir=SLURM_DIR, venv=str(tmp_path / "venv $(x)"))

    srun_argv = _run_rendered(script, tmp_path)

    assert not list(tmp_path.glob("PWNED*")), "a rendered value was executed"
    entry = str(SLURM_DIR / "entrypoint.sh")
    assert srun_argv[srun_argv.index(entry) + 1:] == command
    assert "--container-image=img$(touch PWNED_image)`touch PWNED_image2`;x" in srun_argv
    # The exported environment is exactly what was configured, also for hostile values.
    exports = [shlex.split(line[len("export "):])[0] for line in script.splitlines() if line.startswith("export ")]
    assert f"OLMOE_VENV={tmp_path / 'venv $(x)'}" in exports
    assert "GLOO_SOCKET_IFNAME=lo" in exports


def test_sweep_lines_are_split_never_evaluated(tmp_path):
    sweep = tmp_path / "sweep.txt"
    sweep.write_text(
        "# layouts\n\n--parallel.tensor_parallel=1\n--train.run_name=$(touch PWNED_line) `touch PWNED_bt`;x\n"
    )
    job = _cpu_job()
    script = render_sbatch(
        job, command=["python", "-c", "pass", "--out=runs/{task}.jsonl"], slurm_dir=SLURM_DIR,
        sweep_file=sweep, num_sweep_entries=2,
    )
    assert "#SBATCH --array=0-1" in script and "#SBATCH --output=runs/slurm/%x-%A_%a.out" in script

    srun_argv = _run_rendered(script, tmp_path, extra_env={"SLURM_ARRAY_TASK_ID": "1"})

    assert not list(tmp_path.glob("PWNED*")), "a sweep line was executed"
    entry = str(SLURM_DIR / "entrypoint.sh")
    assert srun_argv[srun_argv.index(entry) + 1:] == [
        "python", "-c", "pass", "--out=runs/1.jsonl", "--train.run_name=$(touch", "PWNED_line)", "`touch", "PWNED_bt`;x",
    ]


# ------------------------------------------------------------------------------------------------
# The world size is checked against the recipe before anything is rendered


def test_world_size_is_checked_with_overrides():
    check_world_size("olmoe_tiny", [], 4)
    with pytest.raises(ConfigError):
        check_world_size("olmoe_tiny", ["--parallel.tensor_parallel=2"], 3)


def test_prepare_refuses_a_world_size_the_layout_cannot_use(tmp_path):
    args = _args("render", "--recipe", "olmoe_tiny", "--nodes", "3", "--gpus-per-node", "0",
                 "--nproc-per-node", "1", "--log-dir", str(tmp_path), "--parallel.tensor_parallel=2")
    with pytest.raises(ConfigError):
        prepare(args)


def test_prepare_checks_every_sweep_entry(tmp_path):
    sweep = tmp_path / "layouts.txt"
    sweep.write_text("# layouts\n--parallel.expert_parallel=1\n\n--parallel.expert_parallel=2\n--parallel.expert_parallel=4\n")
    base = ["render", "--recipe", "olmoe_tiny", "--gpus-per-node", "0", "--log-dir", str(tmp_path), "--sweep", str(sweep)]
    # The file's own line number (5), and the array task that would run it (2).
    with pytest.raises(ConfigError, match=r"layouts.txt:5 \(array task 2: --parallel.expert_parallel=4\)"):
        prepare(_args(*base, "--nodes", "1", "--nproc-per-node", "2"))
    job, script = prepare(_args(*base, "--nodes", "2", "--nproc-per-node", "2"))
    assert job.world_size == 4
    assert "#SBATCH --array=0-2" in script
    assert f"set -- {sweep} olmoe train --recipe olmoe_tiny" in script


def test_prepare_renders_the_trainer_command_with_overrides(tmp_path):
    args = _args("render", "--recipe", "olmoe_tiny", "--nodes", "2", "--gpus-per-node", "0", "--nproc-per-node", "2",
                 "--job-name", "tiny", "--log-dir", str(tmp_path / "logs"), "--venv", "none",
                 "--train.max_steps=5")
    job, script = prepare(args)
    assert job.world_size == 4 and job.job_name == "tiny"
    assert "set -- olmoe train --recipe olmoe_tiny --train.max_steps=5" in script
    assert f"#SBATCH --output={tmp_path}/logs/%x-%j.out" in script
    assert "OLMOE_VENV" not in script


def test_cli_submit_reports_a_config_error_and_submits_nothing(tmp_path):
    result = subprocess.run(
        [str(Path(sys.prefix) / "bin" / "olmoe"), "slurm", "submit", "--recipe", "olmoe_tiny", "--nodes", "3", "--gpus-per-node", "0",
         "--nproc-per-node", "1", "--log-dir", str(tmp_path), "--parallel.tensor_parallel=2"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "config error" in result.stderr
    assert not list(tmp_path.iterdir()), "nothing may be written or submitted"


def test_submit_snapshots_the_checked_sweep_file(tmp_path, fake_sbatch):
    """The job reads the copy checked at submission: an edit of the file afterwards cannot reach it."""
    from olmoe_megatron.launcher.commands.slurm import run

    sweep = tmp_path / "layouts.txt"
    sweep.write_text("--parallel.expert_parallel=1\n--parallel.expert_parallel=2\n")
    logs = tmp_path / "logs"
    args = _args("submit", "--recipe", "olmoe_tiny", "--nodes", "1", "--gpus-per-node", "0", "--nproc-per-node", "2",
                 "--job-name", "sw", "--log-dir", str(logs), "--sweep", str(sweep))
    assert run(args) == 0
    copy = logs / "sw.sweep.txt"
    assert copy.read_text() == sweep.read_text()
    script = (logs / "sw.sbatch").read_text()
    assert f"set -- {copy} olmoe train" in script and str(sweep) + " " not in script
    sweep.write_text("--parallel.expert_parallel=3\n")  # an edit after submitting
    assert "expert_parallel=3" not in copy.read_text()
    assert fake_sbatch.read_text().splitlines() == [f"--parsable {logs / 'sw.sbatch'}"]


def test_a_sweep_file_that_is_not_utf8_is_a_config_error(tmp_path):
    sweep = tmp_path / "layouts.txt"
    sweep.write_bytes(b"--parallel.expert_parallel=1\n--parallel.tensor_parallel=\xff2\n")
    with pytest.raises(ConfigError, match=r"layouts.txt:2: not UTF-8 text"):
        prepare(_args("render", "--recipe", "olmoe_tiny", "--gpus-per-node", "0", "--nproc-per-node", "2",
                      "--log-dir", str(tmp_path), "--sweep", str(sweep)))
