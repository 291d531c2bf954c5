"""Renders slurm/train.sbatch and slurm/sweep.sbatch for one run: the #SBATCH header from a
`SlurmJobConfig`, the job's environment and command as shell-quoted lines, then the template's body.

Nothing a user types is ever evaluated by the job's shell. Values that go into `#SBATCH` lines are
read by sbatch itself, without a shell, where quoting does not protect anything, so they are
restricted to characters that need no quoting (letters, digits and `@%+=:,./-_`) and anything else
is a ConfigError. Values that go into the body (the command, overrides, paths, the container image)
are written with `shlex.quote`.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path
from typing import Literal

from olmoe_megatron.config import Config, ConfigError

#: Characters that `shlex.quote` leaves alone: the only ones allowed in #SBATCH values.
_HEADER_SAFE = re.compile(r"[\w@%+=:,./-]+", re.ASCII)
#: Slurm's time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or UNLIMITED.
_SLURM_TIME = re.compile(r"(\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}|UNLIMITED|unlimited|INFINITE|infinite)")
#: The line in the templates after which everything is copied verbatim into rendered scripts.
BODY_MARKER = "# ---- body:"


def _header_value(field: str, value: str) -> str:
    if not _HEADER_SAFE.fullmatch(value):
        suggestion = re.sub(r"[^\w@%+=:,./-]+", "-", value, flags=re.ASCII).strip("-") or "olmoe"
        raise ConfigError(
            f"slurm.{field}={value!r} contains characters that are not allowed: values written into "
            f"#SBATCH lines may only use letters, digits and @%+=:,./-_ (sbatch reads those lines "
            f"without a shell, so quoting cannot protect them); try {suggestion!r}"
        )
    return value


@dataclasses.dataclass(kw_only=True, frozen=True)
class SlurmJobConfig(Config):
    """The Slurm side of a run: what the #SBATCH header asks for and how the nodes launch ranks."""

    job_name: str = "olmoe"
    """Slurm job name (`--job-name`); also names the log file."""
    nodes: int = 1
    """Number of nodes (`--nodes`), written once: the entrypoint reads it back from Slurm."""
    gpus_per_node: int = 8
    """GPUs per node (`--gpus-per-node`); 0 for a CPU cluster (then set nproc_per_node)."""
    nproc_per_node: int | None = None
    """Ranks per node. Defaults to gpus_per_node; required on CPU (gpus_per_node=0)."""
    cpus_per_task: int | None = None
    """CPUs per Slurm task (`--cpus-per-task`); one task per node under torchrun. None: the site default."""
    time: str = "24:00:00"
    """Time limit (`--time`), in a Slurm time format such as 24:00:00 or 2-00:00:00."""
    partition: str | None = None
    """Partition (`--partition`); None: the cluster default."""
    account: str | None = None
    """Account to charge (`--account`); None: the user's default."""
    qos: str | None = None
    """Quality of service (`--qos`); None: the default."""
    log_dir: str = "runs/slurm"
    """Directory of the job log, `<log_dir>/<job_name>-<job id>.out`; created before submitting."""
    container_image: str | None = None
    """pyxis/enroot image run by srun (`--container-image`); None: no container."""
    container_mounts: str | None = None
    """pyxis `--container-mounts`; None: the submit directory at the same path."""
    requeue: bool = True
    """`--requeue`, and the entrypoint turns the trainer's exit code 75 into `scontrol requeue`."""
    signal_seconds: int = 180
    """Send SIGUSR1 this many seconds before the time limit (`--signal=USR1@N`); 0: no signal."""
    launch: Literal["torchrun", "srun"] = "torchrun"
    """torchrun: one task per node starts the node's ranks; srun: one Slurm task per rank."""
    socket_ifname: str | None = None
    """Network interface for gloo and NCCL bootstrap (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME)."""

    def validate(self) -> None:
        if self.nodes < 1:
            raise ConfigError(f"slurm.nodes={self.nodes} must be at least 1; try --nodes 1")
        if self.gpus_per_node < 0:
            raise ConfigError(f"slurm.gpus_per_node={self.gpus_per_node} must be >= 0; use 0 for a CPU cluster")
        if self.gpus_per_node == 0 and not self.nproc_per_node:
            raise ConfigError(
                f"slurm.nproc_per_node={self.nproc_per_node} must be set when slurm.gpus_per_node=0 "
                f"(a CPU cluster has no GPUs to count ranks by); try --nproc-per-node 2"
            )
        if self.nproc_per_node is not None and self.nproc_per_node < 1:
            raise ConfigError(f"slurm.nproc_per_node={self.nproc_per_node} must be at least 1; try 1")
        if self.gpus_per_node > 0 and self.nproc_per_node not in (None, self.gpus_per_node):
            raise ConfigError(
                f"slurm.nproc_per_node={self.nproc_per_node} must equal slurm.gpus_per_node="
                f"{self.gpus_per_node} (one rank per GPU); drop --nproc-per-node or change --gpus-per-node"
            )
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ConfigError(f"slurm.cpus_per_task={self.cpus_per_task} must be at least 1; try 8")
        if self.signal_seconds < 0:
            raise ConfigError(f"slurm.signal_seconds={self.signal_seconds} must be >= 0 (0 disables it); try 180")
        if not _SLURM_TIME.fullmatch(self.time):
            raise ConfigError(
                f"slurm.time={self.time!r} is not a Slurm time: use minutes, HH:MM:SS or D-HH:MM:SS; "
                f"try 24:00:00"
            )
        for field in ("job_name", "partition", "account", "qos", "log_dir"):
            value = getattr(self, field)
            if value is not None:
                _header_value(field, value)
        for field in ("container_image", "container_mounts", "socket_ifname"):
            value = getattr(self, field)
            if value is not None and ("\n" in value or "\0" in value or not value):
                raise ConfigError(f"slurm.{field}={value!r} must be a non-empty single line; remove the line break")

    @property
    def num_procs_per_node(self) -> int:
        """Ranks on each node."""
        return self.nproc_per_node or self.gpus_per_node

    @property
    def world_size(self) -> int:
        """Ranks in the whole job."""
        return self.nodes * self.num_procs_per_node


def default_slurm_dir() -> Path:
    """The repository's slurm/ directory next to launcher/ (an editable or source install)."""
    return Path(__file__).resolve().parents[1] / "slurm"


def _template_body(path: Path) -> str:
    if not path.is_file():
        raise ConfigError(
            f"slurm template {str(path)!r} does not exist; pass --slurm-dir pointing at the "
            f"repository's slurm/ directory (it must be on a filesystem every node sees)"
        )
    text = path.read_text()
    start = text.find(BODY_MARKER)
    if start < 0:
        raise ConfigError(f"slurm template {str(path)!r} has no {BODY_MARKER!r} line; restore it from git")
    return text[text.index("\n", start) + 1:]


def header_lines(job: SlurmJobConfig, *, num_array_tasks: int | None = None) -> list[str]:
    """The #SBATCH lines for `job` (an array of `num_array_tasks` tasks when given)."""
    if job.launch == "torchrun":
        tasks_per_node = 1
        layout = f"{job.nodes} node(s) x 1 torchrun starting {job.num_procs_per_node} rank(s)"
    else:
        tasks_per_node = job.num_procs_per_node
        layout = f"{job.nodes} node(s) x {tasks_per_node} task(s), one per rank"
    log_name = "%x-%A_%a.out" if num_array_tasks else "%x-%j.out"
    lines = [
        f"# world size {job.world_size}: {layout}",
        f"#SBATCH --job-name={shlex.quote(job.job_name)}",
        f"#SBATCH --nodes={job.nodes}",
        f"#SBATCH --ntasks-per-node={tasks_per_node}",
    ]
    if job.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={job.cpus_per_task}")
    lines.append(f"#SBATCH --time={shlex.quote(job.time)}")
    for field in ("partition", "account", "qos"):
        value = getattr(job, field)
        if value:
            lines.append(f"#SBATCH --{field}={shlex.quote(value)}")
    lines.append(f"#SBATCH --output={shlex.quote(job.log_dir.rstrip('/') + '/' + log_name)}")
    # A requeued job appends to its log instead of truncating it.
    lines.append("#SBATCH --open-mode=append")
    lines.append("#SBATCH --requeue" if job.requeue else "#SBATCH --no-requeue")
    if job.signal_seconds:
        lines.append(f"#SBATCH --signal=USR1@{job.signal_seconds}")
    if num_array_tasks:
        lines.append(f"#SBATCH --array=0-{num_array_tasks - 1}")
    for line in lines:
        # A value that sneaked a line break past validation would start a new shell line.
        assert "\n" not in line, line
    return lines


def job_environment(job: SlurmJobConfig, *, slurm_dir: Path, venv: str | None) -> dict[str, str]:
    """The variables slurm/train.sbatch and slurm/entrypoint.sh read, for this job."""
    env = {"OLMOE_SLURM_DIR": str(slurm_dir), "OLMOE_LAUNCH": job.launch}
    if job.nproc_per_node:
        env["OLMOE_NPROC_PER_NODE"] = str(job.nproc_per_node)
    if venv:
        env["OLMOE_VENV"] = venv
    if not job.requeue:
        env["OLMOE_REQUEUE"] = "0"
    if job.container_image:
        env["OLMOE_CONTAINER_IMAGE"] = job.container_image
    if job.container_mounts:
        env["OLMOE_CONTAINER_MOUNTS"] = job.container_mounts
    if job.socket_ifname:
        env["GLOO_SOCKET_IFNAME"] = job.socket_ifname
        env["NCCL_SOCKET_IFNAME"] = job.socket_ifname
    return env


def render_sbatch(
    job: SlurmJobConfig,
    *,
    command: list[str],
    slurm_dir: Path,
    venv: str | None = None,
    sweep_file: Path | None = None,
    num_sweep_entries: int | None = None,
) -> str:
    """The complete batch script for `job` running `command` on every rank.

    Args:
        job: the Slurm side of the run (validated on construction).
        command: argv run once per rank, e.g. ["olmoe", "train", "--recipe", "olmoe_tiny", ...].
        slurm_dir: the directory holding train.sbatch, sweep.sbatch and entrypoint.sh, on a
            filesystem the compute nodes see.
        venv: a virtualenv put first on PATH on the nodes (None: the nodes' own PATH).
        sweep_file: render sweep.sbatch over this file (one array task per entry) instead of
            train.sbatch; `num_sweep_entries` is then its number of entries.
    """
    if not command:
        raise ConfigError("the job command is empty; give the trainer command, e.g. olmoe train --recipe olmoe_tiny")
    for arg in command:
        if "\0" in arg:
            raise ConfigError(f"command argument {arg!r} contains a NUL byte, which no shell can pass; remove it")
    template = "sweep.sbatch" if sweep_file is not None else "train.sbatch"
    body = _template_body(slurm_dir / template)
    if sweep_file is not None and not num_sweep_entries:
        raise ConfigError(f"sweep file {str(sweep_file)!r} has no entries; write one layout or recipe per line")
    lines = [
        "#!/usr/bin/env bash",
        f"# Rendered by `olmoe slurm render` from {template}. Every value below is shell-quoted.",
        *header_lines(job, num_array_tasks=num_sweep_entries if sweep_file is not None else None),
    ]
    for name, value in job_environment(job, slurm_dir=slurm_dir, venv=venv).items():
        lines.append(f"export {name}={shlex.quote(value)}")
    argv = ([str(sweep_file)] if sweep_file is not None else []) + list(command)
    lines.append("set -- " + " ".join(shlex.quote(arg) for arg in argv))
    lines.append(BODY_MARKER + f" {template} ----")
    return "\n".join(lines) + "\n" + body


def read_sweep_text(path: Path) -> str:
    """The sweep file's text; a missing, unreadable or non-UTF-8 file raises ConfigError."""
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} does not exist; write one layout or recipe per line")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the sweep "
                          "file as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"sweep file {str(path)!r} cannot be read: {exc}") from None


def sweep_entries(text: str) -> list[tuple[int, list[str]]]:
    """(line number, tokens) of each entry, as slurm/sweep.sbatch reads them: one per non-blank line
    that does not start with #, split on whitespace; array task i runs entry i."""
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            entries.append((number, stripped.split()))
    return entries


def read_sweep_entries(path: Path) -> list[list[str]]:
    """The entries of a sweep file (sweep_entries of read_sweep_text), without line numbers."""
    return [tokens for _, tokens in sweep_entries(read_sweep_text(path))]
