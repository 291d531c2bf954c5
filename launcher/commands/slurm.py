"""`olmoe slurm render|submit`: a batch script for a recipe, checked before anything is submitted.

    olmoe slurm render --recipe olmoe_1b_7b --nodes 32 --gpus-per-node 8 --partition gpu \\
        --train.global_batch_size=1024
    olmoe slurm submit --recipe olmoe_tiny --nodes 2 --gpus-per-node 0 --nproc-per-node 2 \\
        --time 10 --train.max_steps=20
    olmoe slurm submit --recipe olmoe_1b_7b --nodes 4 --sweep layouts.txt

The world size (nodes x ranks per node) is checked against the recipe's parallel layout, with the
trailing `--section.field=value` overrides applied, before a script is written; with `--sweep`,
every entry of the sweep file is checked. The rendered script runs
`olmoe train --recipe NAME OVERRIDES...` through slurm/entrypoint.sh on every node.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

from olmoe_megatron.config import ConfigError
from olmoe_megatron.launcher.slurm_render import (
    SlurmJobConfig,
    default_slurm_dir,
    read_sweep_text,
    render_sbatch,
    sweep_entries,
)

NAME = "slurm"
HELP = "render or submit a Slurm batch job for a recipe (world size checked first)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SlurmJobConfig()
    parser.add_argument("action", choices=("render", "submit"),
                        help="render: print the script; submit: write it next to the logs and sbatch it")
    parser.add_argument("--recipe", required=True, help="recipe name (olmoe_megatron.recipes)")
    parser.add_argument("--nodes", type=int, default=defaults.nodes, help="number of nodes")
    parser.add_argument("--gpus-per-node", type=int, default=defaults.gpus_per_node,
                        help="GPUs per node (0 on a CPU cluster; then give --nproc-per-node)")
    parser.add_argument("--nproc-per-node", type=int, default=None, help="ranks per node on a CPU cluster")
    parser.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per Slurm task")
    parser.add_argument("--time", default=defaults.time, help="time limit, e.g. 24:00:00")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--qos", default=None)
    parser.add_argument("--job-name", default=None, help="job name (default: the recipe name)")
    parser.add_argument("--log-dir", default=defaults.log_dir, help="directory of the job logs")
    parser.add_argument("--container-image", default=None, help="pyxis/enroot image for srun")
    parser.add_argument("--container-mounts", default=None, help="pyxis --container-mounts")
    parser.add_argument("--requeue", action=argparse.BooleanOptionalAction, default=defaults.requeue,
                        help="requeue the job when the trainer exits 75 after a preemption checkpoint")
    parser.add_argument("--signal-seconds", type=int, default=defaults.signal_seconds,
                        help="SIGUSR1 this many seconds before the time limit (0: none)")
    parser.add_argument("--launch", choices=("torchrun", "srun"), default=defaults.launch,
                        help="torchrun: one task per node; srun: one task per rank")
    parser.add_argument("--socket-ifname", default=None, help="GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME")
    parser.add_argument("--sweep", type=Path, default=None,
                        help="job array over this file: one layout or recipe per line (slurm/sweep.sbatch); "
                             "{task} in an override becomes the array task id")
    parser.add_argument("--venv", default=None,
                        help="virtualenv to put first on PATH on the nodes (default: the current one, "
                             "unless a container image is given; 'none' for neither)")
    parser.add_argument("--slurm-dir", type=Path, default=None,
                        help="directory with train.sbatch and entrypoint.sh (default: the repository's slurm/)")
    parser.add_argument("--output", type=Path, default=None, help="render: write the script here instead of stdout")
    parser.add_argument("--dry-run", action="store_true", help="submit: print the script, submit nothing")
    parser.set_defaults(_accepts_overrides=True)


def _split_recipe(tokens: list[str], default: str) -> tuple[str, list[str]]:
    """(`--recipe` of a sweep entry or `default`, the remaining tokens as overrides)."""
    recipe, rest, i = default, [], 0
    while i < len(tokens):
        token = tokens[i]
        if token == "--recipe" and i + 1 < len(tokens):
            recipe, i = tokens[i + 1], i + 2
            continue
        if token.startswith("--recipe="):
            recipe = token.split("=", 1)[1]
        else:
            rest.append(token)
        i += 1
    return recipe, rest


def check_world_size(recipe: str, overrides: list[str], world_size: int, *, backend: str = "nccl") -> None:
    """Raises ConfigError unless `world_size` ranks fit the layout of `recipe` with `overrides`.

    Args:
        recipe: recipe name.
        overrides: dotted overrides (`--parallel.expert_parallel=8`) applied first.
        world_size: nodes x ranks per node.
        backend: "nccl" on GPU nodes, "gloo" on CPU nodes (some layout rules differ).
    """
    from olmoe_megatron.recipes import get_recipe

    get_recipe(recipe).with_overrides(list(overrides)).validate_world_size(world_size, backend=backend)


def _venv(args: argparse.Namespace) -> str | None:
    if args.venv == "none":
        return None
    if args.venv:
        return str(Path(args.venv).resolve())
    if args.container_image or sys.prefix == sys.base_prefix:
        return None
    return sys.prefix


def _snapshot_sweep(text: str, path: Path) -> Path:
    """Writes the checked sweep text to `path` (atomically) and returns it."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)
    return path


def prepare(args: argparse.Namespace, *, snapshot: bool = False) -> tuple[SlurmJobConfig, str]:
    """Checks the run against the world size and renders its script: (job config, script text).

    Args:
        args: the parsed `olmoe slurm` arguments, with `args.overrides`.
        snapshot: copy the checked sweep file into the log directory and render the script over
            the copy (what `submit` does, so an edit after submitting cannot reach the job).
    """
    overrides = list(args.overrides)
    # Every SlurmJobConfig field has a command-line option of the same name.
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(SlurmJobConfig)}
    fields["job_name"] = args.job_name or args.recipe
    # Absolute, so the job writes where the user looked, whatever its working directory.
    fields["log_dir"] = str(Path(args.log_dir).resolve())
    job = SlurmJobConfig(**fields)
    backend = "nccl" if job.gpus_per_node else "gloo"
    check_world_size(args.recipe, overrides, job.world_size, backend=backend)
    sweep_file, num_entries = None, None
    if args.sweep is not None:
        sweep_file = args.sweep.resolve()
        text = read_sweep_text(sweep_file)
        entries = sweep_entries(text)
        for index, (line, entry) in enumerate(entries):
            recipe, entry_overrides = _split_recipe(entry, args.recipe)
            try:
                check_world_size(recipe, overrides + entry_overrides, job.world_size, backend=backend)
            except ConfigError as exc:
                raise ConfigError(f"{sweep_file}:{line} (array task {index}: {' '.join(entry)}): {exc}") from None
        num_entries = len(entries)
        if snapshot:
            # The job reads its entries when each array task starts: it gets the text checked here,
            # not whatever the file holds by then.
            sweep_file = _snapshot_sweep(text, Path(job.log_dir) / f"{job.job_name}.sweep.txt")

    slurm_dir = (args.slurm_dir or default_slurm_dir()).resolve()
    script = render_sbatch(
        job,
        command=["olmoe", "train", "--recipe", args.recipe, *overrides],
        slurm_dir=slurm_dir,
        venv=_venv(args),
        sweep_file=sweep_file,
        num_sweep_entries=num_entries,
    )
    return job, script


def run(args: argparse.Namespace) -> int:
    job, script = prepare(args, snapshot=args.action == "submit" and not args.dry_run)
    if args.action == "render" or args.dry_run:
        if args.output is not None:
            args.output.write_text(script)
        else:
            sys.stdout.write(script)
        return 0

    log_dir = Path(job.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)  # sbatch cannot create it; the job would lose its log
    script_path = log_dir / f"{job.job_name}.sbatch"
    script_path.write_text(script)
    result = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"olmoe slurm submit: sbatch failed ({result.returncode}): {result.stderr.strip()}", file=sys.stderr)
        return result.returncode
    job_id = result.stdout.strip().split(";")[0]
    print(job_id)
    print(f"olmoe slurm submit: job {job_id}, script {script_path}, logs in {log_dir}", file=sys.stderr)
    return 0
