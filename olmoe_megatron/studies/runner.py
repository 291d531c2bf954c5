"""Running a study's members: locally one after another, each through `olmoe launch`, or as the
lines of a Slurm sweep. Either way a member runs `olmoe study train-member --recipe NAME --config
members/<name>/member.yaml`, which trains and, after a clean exit, writes members/<name>/done.json.

Resuming: a member with done.json is finished and never rerun; any other member is (re)started,
and the trainer resumes from its own checkpoint.dir's `latest` when there is one.

With `same_init: true` the study's initial weights (studies/init.py) are written first, by `olmoe
study init DIR` in a process of its own (a world of one); on Slurm, as a one-task job the array
depends on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from olmoe_megatron.training.exit_codes import EXIT_NONFINITE, EXIT_OK

logger = logging.getLogger(__name__)

#: Exit codes that end a member for good (done.json is written): finished, or stopped after
#: too many non-finite losses (a result of the study: rerunning would diverge again).
FINAL_EXIT_CODES = {EXIT_OK: "finished", EXIT_NONFINITE: "stopped: non-finite losses"}


def write_done(member_dir: Path, exit_code: int, *, extra: dict[str, Any] | None = None) -> Path:
    """The member's done.json (atomic), written once its training exited with a final code."""
    from olmoe_megatron.studies.plan import _atomic_write

    record = {"exit_code": exit_code, "status": FINAL_EXIT_CODES[exit_code],
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(extra or {})}
    path = Path(member_dir) / "done.json"
    _atomic_write(path, json.dumps(record, indent=1) + "\n")
    return path


def read_done(member_dir: Path) -> dict[str, Any] | None:
    path = Path(member_dir) / "done.json"
    return json.loads(path.read_text()) if path.is_file() else None


def member_state(member: dict[str, Any]) -> str:
    """'finished' (done.json), 'started' (a checkpoint or metrics, no done.json) or 'new'."""
    member_dir = Path(member["dir"])
    if (member_dir / "done.json").is_file():
        return "finished"
    if (member_dir / "checkpoints").exists() or (member_dir / "metrics.jsonl").exists():
        return "started"
    return "new"


def init_command(study_dir: str | Path, *, python: str = sys.executable) -> list[str]:
    """`olmoe study init DIR` as argv: writes the study's pending initial weights."""
    return [python, "-m", "olmoe_megatron.launcher.cli", "study", "init", str(study_dir)]


def write_inits(plan: dict[str, Any], study_dir: str | Path, *, python: str = sys.executable,
                env: dict[str, str] | None = None) -> int:
    """Runs `olmoe study init` when the plan has initial weights still to write; its exit code (0
    when there is nothing to write)."""
    from olmoe_megatron.studies.init import pending_inits

    pending = pending_inits(plan)
    if not pending:
        return 0
    logger.info("study %s: writing the initial weights %s", plan["study"], ", ".join(sorted(pending)))
    from olmoe_megatron.parallel.context import without_rendezvous

    return subprocess.call(init_command(study_dir, python=python),
                           env=without_rendezvous(dict(env if env is not None else os.environ)))


def member_command(member: dict[str, Any], *, python: str = sys.executable) -> list[str]:
    """`olmoe launch -n NPROC -- study train-member --recipe R --config member.yaml` as argv."""
    return [python, "-m", "olmoe_megatron.launcher.cli", "launch", "-n", str(member["nproc"]), "--",
            "study", "train-member", "--recipe", member["recipe"], "--config", str(Path(member["dir"]) / "member.yaml")]


@dataclasses.dataclass(frozen=True)
class MemberOutcome:
    name: str
    state: str
    """'skipped' (already finished), 'finished', 'stopped' (non-finite), 'failed'."""
    exit_code: int | None
    seconds: float


def run_local(plan: dict[str, Any], *, only: list[str] | None = None, python: str = sys.executable,
              env: dict[str, str] | None = None, keep_going: bool = False) -> list[MemberOutcome]:
    """Runs the plan's unfinished members one after another; stops at the first failure.

    Args:
        plan: plan.json's content (studies/plan.py).
        only: member names to consider (None: all).
        python: the interpreter that runs `olmoe launch`.
        env: the environment of the launches (None: this process's).
        keep_going: go on with the next member after a failure.
    """
    names = {m["name"] for m in plan["members"]}
    unknown = sorted(set(only or ()) - names)
    if unknown:
        from olmoe_megatron.studies.spec import StudyError

        raise StudyError(f"--member {', '.join(unknown)}: not in study {plan['study']!r}; its members: "
                         f"{', '.join(sorted(names))}")
    wanted = [m for m in plan["members"] if (not only or m["name"] in only) and member_state(m) != "finished"]
    if wanted:
        code = write_inits({**plan, "members": wanted}, Path(wanted[0]["dir"]).parent.parent, python=python, env=env)
        if code != 0:
            logger.error("study %s: `olmoe study init` exited %d; no member ran", plan["study"], code)
            return [MemberOutcome("init", "failed", code, 0.0)]
    outcomes = []
    for member in plan["members"]:
        if only and member["name"] not in only:
            continue
        if member_state(member) == "finished":
            logger.info("study %s: member %s finished before; skipping", plan["study"], member["name"])
            outcomes.append(MemberOutcome(member["name"], "skipped", read_done(Path(member["dir"]))["exit_code"], 0.0))
            continue
        command = member_command(member, python=python)
        logger.info("study %s: member %s (%s, %d processes): %s", plan["study"], member["name"],
                    member_state(member), member["nproc"], " ".join(command[2:]))
        start = time.perf_counter()
        code = subprocess.call(command, env=env if env is not None else dict(os.environ))
        seconds = time.perf_counter() - start
        done = read_done(Path(member["dir"]))
        if done is not None:  # torchrun turns a rank's exit 76 into 1: the marker says what happened
            state = "finished" if done["exit_code"] == EXIT_OK else "stopped"
            outcomes.append(MemberOutcome(member["name"], state, done["exit_code"], seconds))
            continue
        logger.error("study %s: member %s exited %d after %.0f s; rerun `olmoe study run` to resume it",
                     plan["study"], member["name"], code, seconds)
        outcomes.append(MemberOutcome(member["name"], "failed", code, seconds))
        if not keep_going:
            break
    return outcomes
