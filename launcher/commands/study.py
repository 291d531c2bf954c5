"""`olmoe study`: sets of runs compared at one token budget (olmoe_megatron/studies).

    olmoe study list                                    # the built-in studies
    olmoe study plan granularity --dir runs/studies/g   # resolve and write the plan, run nothing
    olmoe study run granularity --dir runs/studies/g    # every unfinished member, one after another
    olmoe study run runs/studies/g                      # resume from the written plan
    olmoe study submit granularity --nodes 1 --gpus-per-node 8 --partition gpu   # one Slurm array
    olmoe study init runs/studies/layouts               # same_init: write the initial weights (run does it too)
    olmoe study status runs/studies/g
    olmoe study report runs/studies/g                   # report.md, report.html and PNGs in g/report

Every member's run config is resolved and checked before anything is written or run; one that
fails rejects the whole study. A member runs `olmoe study train-member --recipe NAME --config
members/NAME/member.yaml` (through `olmoe launch` locally, or as a line of slurm/sweep.sbatch),
which writes members/NAME/done.json after a clean exit; finished members are never rerun, and
killed ones resume from their own checkpoints. A study with `same_init: true` first writes one set
of initial weights per seed (`olmoe study init`, a world of one process; on Slurm a one-task job
the array depends on) and every member starts from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from olmoe_megatron.config import ConfigError

NAME = "study"
HELP = "plan, run (locally or as a Slurm array), resume and report a study of runs (recipes x overrides x seeds)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="study_action", required=True, metavar="ACTION")
    sub.add_parser("list", help="the built-in studies")
    for action, text in (("plan", "resolve every member and write the plan; run nothing"),
                         ("run", "run the unfinished members here, one after another, each through olmoe launch")):
        p = sub.add_parser(action, help=text)
        p.add_argument("study", help="a study file, a built-in study name, or (run) a study directory with plan.json")
        p.add_argument("--dir", type=Path, default=None, help="study directory (default runs/studies/<name>)")
        if action == "run":
            p.add_argument("--member", action="append", default=None, help="run only this member (repeatable)")
            p.add_argument("--keep-going", action="store_true", help="go on with the next member after a failure")
    p = sub.add_parser("submit", help="render and sbatch one Slurm array over the unfinished members")
    p.add_argument("study", help="a study file, a built-in study name or a study directory")
    p.add_argument("--dir", type=Path, default=None, help="study directory (default runs/studies/<name>)")
    _add_slurm_arguments(p)
    p = sub.add_parser("init", help="same_init: write the study's initial weights (one process; run/submit do it)")
    p.add_argument("dir", type=Path, help="the study directory (plan.json)")
    p = sub.add_parser("status", help="each member's state: finished, started or new")
    p.add_argument("dir", type=Path)
    p = sub.add_parser("report", help="Markdown and self-contained HTML report with PNG plots")
    p.add_argument("dir", type=Path, help="the study directory")
    p.add_argument("--out", type=Path, default=None, help="output directory (default DIR/report)")
    p.add_argument("--warmup-steps", type=int, default=1, help="leading steps left out of tokens/s and MFU")
    p = sub.add_parser("train-member", help="(run per rank by `study run`/`submit`) train one member, mark it done")
    from olmoe_megatron.launcher.run_args import add_run_arguments

    add_run_arguments(p)


def _add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    from olmoe_megatron.launcher.slurm_render import SlurmJobConfig

    defaults = SlurmJobConfig()
    parser.add_argument("--nodes", type=int, default=defaults.nodes)
    parser.add_argument("--gpus-per-node", type=int, default=defaults.gpus_per_node,
                        help="GPUs per node (0 on a CPU cluster; then give --nproc-per-node)")
    parser.add_argument("--nproc-per-node", type=int, default=None)
    parser.add_argument("--cpus-per-task", type=int, default=None)
    parser.add_argument("--time", default=defaults.time)
    for name in ("partition", "account", "qos", "job-name", "container-image", "container-mounts", "socket-ifname"):
        parser.add_argument(f"--{name}", default=None)
    parser.add_argument("--log-dir", default=None, help="job logs (default DIR/slurm)")
    parser.add_argument("--venv", default=None, help="virtualenv on the nodes (default: the current one; 'none')")
    parser.add_argument("--slurm-dir", type=Path, default=None)
    parser.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")


# ------------------------------------------------------------------ plan
def _backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def load_or_plan(study: str, study_dir: Path | None, *, write: bool = True, backend: str | None = None):
    """(plan dict, study dir): from a study directory's plan.json, or resolved from a study file
    (and written, atomically, when `write`)."""
    from olmoe_megatron.studies import study_file
    from olmoe_megatron.studies.plan import read_plan, resolve_study, write_plan
    from olmoe_megatron.studies.spec import parse_study

    as_dir = Path(study)
    if as_dir.is_dir() and (as_dir / "plan.json").is_file():
        return read_plan(as_dir), as_dir.resolve()
    spec = parse_study(study_file(study))
    target = study_dir or Path("runs") / "studies" / spec.name
    plan = resolve_study(spec, study_dir=target, backend=backend or _backend())
    if write:
        write_plan(plan)
    return plan.to_dict(), plan.dir


def _print_plan(plan: dict, study_dir: Path) -> None:
    from olmoe_megatron.studies.runner import member_state

    print(f"study {plan['study']}: {len(plan['members'])} members in {study_dir}; budget "
          + ", ".join(f"{k} {v:,}" for k, v in plan["budget"].items()) + f"; data seed {plan['data_seed']}")
    for m in plan["members"]:
        print(f"  {m['name']:<28} {m['recipe']:<26} seed {m['seed']:<6} nproc {m['nproc']}  "
              f"{m['params_total'] / 1e6:8.2f}M total {m['params_active'] / 1e6:7.2f}M active  {member_state(m)}")


# ------------------------------------------------------------------ report
def build_report(study_dir: Path, out_dir: Path | None = None, *, warmup_steps: int = 1):
    """(paths of the written report files, member summaries) of a study directory.

    tokens/s, MFU and peak memory are launcher/slurm_sweep.py's summaries of each member's file."""
    from olmoe_megatron.launcher.slurm_sweep import read_records, summarize
    from olmoe_megatron.studies.plan import read_plan
    from olmoe_megatron.studies.report import summarize_member, write_report
    from olmoe_megatron.studies.runner import member_state

    plan = read_plan(study_dir)
    members = []
    for member in plan["members"]:
        path = Path(member["dir"]) / "metrics.jsonl"
        records = read_records(path) if path.is_file() else []
        throughput = summarize([path], num_warmup_steps=warmup_steps) if records else []
        members.append(summarize_member(member, records, throughput[0] if throughput else None,
                                        state=member_state(member)))
    paths = write_report(plan, members, out_dir or Path(study_dir) / "report")
    return paths, members


# ------------------------------------------------------------------ slurm
def prepare_submit(args: argparse.Namespace) -> tuple[str, Path, int, str | None]:
    """(array script, study dir, number of array tasks, init script or None) for the unfinished
    members; checks each member against the job's world size first. The init script (same_init,
    initial weights not written yet) is a one-task job the array must depend on."""
    from olmoe_megatron.launcher.commands.slurm import _venv
    from olmoe_megatron.launcher.slurm_render import SlurmJobConfig, default_slurm_dir, render_sbatch
    from olmoe_megatron.run_config import RunConfig
    from olmoe_megatron.studies.plan import _atomic_write
    from olmoe_megatron.studies.runner import member_state
    from olmoe_megatron.studies.spec import StudyError

    backend = "nccl" if args.gpus_per_node else "gloo"
    plan, study_dir = load_or_plan(args.study, args.dir, backend=backend)
    fields = {f.name for f in dataclasses.fields(SlurmJobConfig)}
    given = {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}
    given["job_name"] = args.job_name or f"study-{plan['study']}"
    given["log_dir"] = str(Path(args.log_dir).resolve() if args.log_dir else study_dir / "slurm")
    job = SlurmJobConfig(**given)
    pending = [m for m in plan["members"] if member_state(m) != "finished"]
    if not pending:
        raise StudyError(f"every member of study {plan['study']!r} in {study_dir} is finished; nothing to submit "
                         f"(`olmoe study report {study_dir}`)")
    for member in pending:
        try:
            RunConfig.from_dict(member["config"]).validate_world_size(job.world_size, backend=backend)
        except ConfigError as exc:
            raise StudyError(f"member {member['name']!r} on {job.world_size} ranks: {exc}") from None
    init_script = None
    from olmoe_megatron.studies.init import pending_inits

    if pending_inits({**plan, "members": pending}):
        init_job = SlurmJobConfig(**{**given, "job_name": f"{given['job_name']}-init", "nodes": 1,
                                     "gpus_per_node": 1 if job.gpus_per_node else 0,
                                     "nproc_per_node": None if job.gpus_per_node else 1})
        init_script = render_sbatch(init_job, command=["olmoe", "study", "init", str(study_dir)],
                                    slurm_dir=(args.slurm_dir or default_slurm_dir()).resolve(), venv=_venv(args))
    sweep = study_dir / "sweep-slurm.txt"
    _atomic_write(sweep, "".join(f"--recipe {m['recipe']} --config {Path(m['dir']) / 'member.yaml'}\n" for m in pending))
    script = render_sbatch(job, command=["olmoe", "study", "train-member"],
                           slurm_dir=(args.slurm_dir or default_slurm_dir()).resolve(), venv=_venv(args),
                           sweep_file=sweep, num_sweep_entries=len(pending))
    return script, study_dir, len(pending), init_script


def _submit(args: argparse.Namespace) -> int:
    import subprocess

    script, study_dir, num_tasks, init_script = prepare_submit(args)
    if args.dry_run:
        if init_script is not None:
            sys.stdout.write(init_script + "\n# --- then, with --dependency=afterok:<the init job's id>:\n")
        sys.stdout.write(script)
        return 0
    (study_dir / "slurm").mkdir(parents=True, exist_ok=True)

    def sbatch(path: Path, text: str, *extra: str) -> str | None:
        path.write_text(text)
        result = subprocess.run(["sbatch", "--parsable", *extra, str(path)], capture_output=True, text=True)
        if result.returncode != 0:
            print(f"olmoe study submit: sbatch {path.name} failed ({result.returncode}): {result.stderr.strip()}",
                  file=sys.stderr)
            return None
        return result.stdout.strip().split(";")[0]

    dependency = []
    if init_script is not None:
        init_id = sbatch(study_dir / "slurm" / "study-init.sbatch", init_script)
        if init_id is None:
            return 1
        print(init_id)
        print(f"olmoe study submit: initial weights job {init_id}, script {study_dir / 'slurm' / 'study-init.sbatch'}",
              file=sys.stderr)
        dependency = [f"--dependency=afterok:{init_id}", "--kill-on-invalid-dep=yes"]
    job_id = sbatch(study_dir / "slurm" / "study.sbatch", script, *dependency)
    if job_id is None:
        return 1
    print(job_id)
    print(f"olmoe study submit: {num_tasks} array tasks, script {study_dir / 'slurm' / 'study.sbatch'}"
          + (f", after job {dependency[0].split(':')[1]}" if dependency else ""), file=sys.stderr)
    return 0


# ------------------------------------------------------------------ member
def _check_study_init(run_config, member_file: Path) -> None:
    """A same_init member that has not saved yet needs the study's initial weights."""
    from olmoe_megatron.checkpoint.format import read_latest

    init_from = run_config.checkpoint.init_from
    study_dir = member_file.resolve().parent.parent.parent
    if init_from is None or Path(init_from).parent != study_dir / "init" or Path(init_from).is_dir():
        return
    if read_latest(run_config.checkpoint.dir) is None:
        raise ConfigError(f"checkpoint.init_from={init_from!r}: the study's initial weights are not written yet; "
                          f"run `olmoe study init {study_dir}` first (`olmoe study run` and `submit` do it)")


def _train_member(args: argparse.Namespace) -> int:
    from olmoe_megatron.checkpoint.format import CheckpointFormatError
    from olmoe_megatron.data.errors import DataError
    from olmoe_megatron.launcher.run_args import resolve_run_config
    from olmoe_megatron.studies.runner import FINAL_EXIT_CODES, write_done
    from olmoe_megatron.training.trainer import train

    if not args.config:
        raise ConfigError("study train-member needs --config members/NAME/member.yaml (written by `olmoe study plan`)")
    run_config = resolve_run_config(args)
    _check_study_init(run_config, Path(args.config))
    try:
        code = train(run_config)
    except DataError as exc:
        print(f"olmoe study train-member: data error: {exc}", file=sys.stderr)
        return 2
    except CheckpointFormatError as exc:
        print(f"olmoe study train-member: checkpoint error: {exc}", file=sys.stderr)
        return 2
    if code in FINAL_EXIT_CODES and os.environ.get("RANK", "0") == "0":
        write_done(Path(args.config).parent, code, extra={"run": run_config.name})
    return code


def run(args: argparse.Namespace) -> int:
    action = args.study_action
    if action == "list":
        from olmoe_megatron.studies import builtin_studies

        for name, description in builtin_studies().items():
            print(f"{name:<16} {description}")
        return 0
    if action == "train-member":
        return _train_member(args)
    if action == "submit":
        return _submit(args)
    if action == "init":
        from olmoe_megatron.studies.init import pending_inits, write_pending_inits
        from olmoe_megatron.studies.plan import read_plan

        plan = read_plan(args.dir)
        if not plan.get("same_init"):
            print(f"olmoe study init: study {plan['study']!r} has no same_init; its members draw their own "
                  "initial weights", file=sys.stderr)
            return 0
        todo = pending_inits(plan)
        for path in write_pending_inits(plan):
            print(f"olmoe study init: wrote {path}")
        if not todo:
            print(f"olmoe study init: every initial checkpoint of {args.dir} exists")
        return 0
    if action == "status":
        from olmoe_megatron.studies.plan import read_plan

        _print_plan(read_plan(args.dir), args.dir)
        return 0
    if action == "report":
        paths, _ = build_report(args.dir, args.out, warmup_steps=args.warmup_steps)
        print(f"olmoe study report: {paths['report.md']} and {paths['report.html']}")
        return 0
    plan, study_dir = load_or_plan(args.study, args.dir)
    _print_plan(plan, study_dir)
    if action == "plan":
        return 0
    from olmoe_megatron.studies.runner import run_local

    outcomes = run_local(plan, only=args.member, keep_going=args.keep_going)
    for outcome in outcomes:
        print(f"  {outcome.name:<28} {outcome.state:<9} exit {outcome.exit_code}  {outcome.seconds:.0f} s")
    failed = [o for o in outcomes if o.state == "failed"]
    if failed:
        print(f"olmoe study run: {len(failed)} member(s) failed; rerun `olmoe study run {study_dir}` to resume",
              file=sys.stderr)
        return failed[0].exit_code or 1
    print(f"olmoe study run: done; `olmoe study report {study_dir}`")
    return 0
