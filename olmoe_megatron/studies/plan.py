"""A study's plan: every member's RunConfig, resolved and checked before anything runs, then
written atomically.

Which seed is which: `seeds` set `train.seed`, the seed of the model's initialisation (and of
every other RNG stream of the trainer); `data_seed` sets `data.seed`, the seed of the data order,
and is the same for every member, so every member sees the same sequences in the same order, and
(with the same `eval` section) is evaluated on the same held-out windows. Two seeds of one recipe
therefore differ only in their initial weights.

Each member's run config is `get_recipe(recipe).with_overrides(...)` of, in this order (a later
key wins): the budget (train.max_tokens or train.max_steps, and train.t_max_tokens when
fit_schedule), train.seed, data.seed, the `eval` section, the shared overrides, the member's own
overrides, and the study's own keys: name, checkpoint.dir and metrics.jsonl under the member's
directory (and, with `same_init: true`, checkpoint.init_from = init/seed<N>). The last ones belong
to the study (resuming depends on them), so overrides may not set them, nor the budget or the seeds
the study sets.

Study directory:
    plan.json                  the resolved plan (written last, atomically)
    members/<name>/member.yaml the member's dotted overrides over its recipe (`--config` of
                               `olmoe study train-member --recipe NAME --config ...`)
    members/<name>/checkpoints/, metrics.jsonl, done.json (written after a clean exit)
    init/seed<N>/              with same_init: the seed's initial weights (`olmoe study init`)
    sweep.txt                  one `--recipe NAME --config members/<name>/member.yaml` per member
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import typing
from pathlib import Path
from typing import Any

import yaml

from olmoe_megatron.config import Config, ConfigError
from olmoe_megatron.studies.spec import StudyError, StudySpec

PLAN_VERSION = 1
#: Override keys the study sets itself, with what to use instead.
STUDY_OWNED = {
    "name": "the member's `name`",
    "checkpoint.dir": "the study directory (--dir); each member saves under members/<name>/checkpoints",
    "metrics.jsonl": "the study directory; each member writes members/<name>/metrics.jsonl",
    "train.max_steps": "the study's `steps:` budget",
    "train.max_tokens": "the study's `tokens:` budget",
}
#: Owned by the study only when it has `same_init: true`.
SAME_INIT_OWNED = {"checkpoint.init_from": "the study's initial weights (same_init: true writes init/seed<N>)"}


@dataclasses.dataclass(frozen=True)
class MemberPlan:
    """One resolved member: what runs, where, on how many processes."""

    name: str
    recipe: str
    seed: int
    overrides: dict[str, Any]
    """Every dotted override over the recipe, study-owned keys included."""
    nproc: int
    dir: Path
    config: Any
    """The resolved RunConfig."""
    init_from: Path | None = None
    """With same_init: the study's initial weights this member starts from (init/seed<N>)."""

    @property
    def member_file(self) -> Path:
        return self.dir / "member.yaml"

    @property
    def done_file(self) -> Path:
        return self.dir / "done.json"

    @property
    def metrics_file(self) -> Path:
        return self.dir / "metrics.jsonl"

    def sweep_line(self) -> str:
        return f"--recipe {self.recipe} --config {self.member_file}"

    def to_dict(self) -> dict[str, Any]:
        model = self.config.model
        return {
            "name": self.name, "recipe": self.recipe, "seed": self.seed, "nproc": self.nproc,
            "dir": str(self.dir), "overrides": self.overrides,
            "params_total": model.num_params(), "params_active": model.num_params(active=True),
            "tokens_per_step": self.config.train.tokens_per_step, "config": self.config.to_dict(),
            "init_from": None if self.init_from is None else str(self.init_from),
        }


@dataclasses.dataclass(frozen=True)
class StudyPlan:
    spec: StudySpec
    dir: Path
    members: tuple[MemberPlan, ...]

    def to_dict(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "version": PLAN_VERSION, "study": spec.name, "description": spec.description, "source": spec.source,
            "budget": {spec.budget_kind: spec.budget}, "seeds": list(spec.seeds),
            "data_seed": self.members[0].config.data.seed, "loss_tolerance": spec.loss_tolerance,
            "same_init": spec.same_init, "members": [m.to_dict() for m in self.members],
        }


def _check_key(key: str, *, where: str) -> None:
    """Raises StudyError unless `key` names a RunConfig field (so the error points at its line)."""
    from olmoe_megatron.run_config import RunConfig

    cls: Any = RunConfig
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not (isinstance(cls, type) and issubclass(cls, Config)):
            raise StudyError(f"{where}: override {key!r}: {'.'.join(parts[:depth])} is a value, not a section")
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            import difflib

            prefix = ".".join(parts[:depth]) + ("." if depth else "")
            close = difflib.get_close_matches(part, names, n=2)
            hint = f"did you mean {' or '.join(prefix + c for c in close)}? " if close else ""
            raise StudyError(f"{where}: unknown config key {key!r} ({cls.__name__} has no field {part!r}); "
                             f"{hint}valid: {', '.join(prefix + n for n in names)}")
        cls = typing.get_type_hints(cls)[part]


def _check_owned(overrides: dict[str, Any], spec: StudySpec, *, where_of) -> None:
    owned = {**STUDY_OWNED, **(SAME_INIT_OWNED if spec.same_init else {})}
    for key in overrides:
        if key in owned:
            raise StudyError(f"{where_of(key)}: override {key}={overrides[key]!r} is set by the study; "
                             f"use {owned[key]}")
        if key == "train.seed" and spec.seeds:
            raise StudyError(f"{where_of(key)}: override train.seed={overrides[key]!r} conflicts with the "
                             f"study's seeds {list(spec.seeds)}; list the seed under `seeds`")
        if key == "data.seed" and spec.data_seed is not None:
            raise StudyError(f"{where_of(key)}: override data.seed={overrides[key]!r} conflicts with the "
                             f"study's data_seed={spec.data_seed}; keep one")


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} vs {vb!r}")
    return out


def resolve_study(spec: StudySpec, *, study_dir: str | Path, backend: str = "gloo") -> StudyPlan:
    """Every member's RunConfig, each checked, and the rules across members; raises StudyError.

    Args:
        spec: the parsed study file.
        study_dir: where the members will write (made absolute; nothing is written here).
        backend: 'gloo' (CPU) or 'nccl' (GPU): the members' layouts are checked for it at their nproc.
    """
    from olmoe_megatron.recipes import get_recipe

    study_dir = Path(study_dir).resolve()
    for key in spec.overrides:
        _check_key(key, where=spec.where("overrides", key))
    _check_owned(spec.overrides, spec, where_of=lambda k: spec.where("overrides", k))
    eval_overrides = {f"eval.{k}": v for k, v in spec.eval.items()}
    for key in eval_overrides:
        _check_key(key, where=spec.where("eval", key.removeprefix("eval.")))
    seeds = spec.seeds or (None,)
    members: list[MemberPlan] = []
    for member in spec.members:
        for key in member.overrides:
            _check_key(key, where=member.where)
        _check_owned(member.overrides, spec, where_of=lambda k, m=member: m.where)
        try:
            base = get_recipe(member.recipe)
        except ConfigError as exc:
            raise StudyError(f"{member.where}: member {member.name!r}: {exc}") from None
        for seed in seeds:
            name = member.name if seed is None or len(seeds) == 1 else f"{member.name}-seed{seed}"
            member_dir = study_dir / "members" / name
            dotted: dict[str, Any] = {}
            if spec.budget_kind == "tokens":
                dotted.update({"train.max_tokens": spec.budget, "train.max_steps": None})
            else:
                dotted.update({"train.max_steps": spec.budget, "train.max_tokens": None})
            if seed is not None:
                dotted["train.seed"] = seed
            if spec.data_seed is not None:
                dotted["data.seed"] = spec.data_seed
            dotted.update(eval_overrides)
            dotted.update(spec.overrides)
            dotted.update(member.overrides)
            dotted.update({"name": name, "checkpoint.dir": str(member_dir / "checkpoints"),
                           "metrics.jsonl": str(member_dir / "metrics.jsonl")})
            where = f"{member.where}: member {name!r} (recipe {member.recipe})"
            init_from = None
            if spec.same_init:
                if base.checkpoint.init_from is not None:
                    raise StudyError(
                        f"{where}: the recipe starts from checkpoint.init_from={base.checkpoint.init_from!r}, "
                        f"which same_init would replace by the study's initial weights; set same_init: false "
                        f"({spec.where('same_init')}) or leave this recipe out")
            try:
                config = base.with_overrides(dict(dotted))
                fit = spec.fit_schedule and "train.t_max_tokens" not in {**spec.overrides, **member.overrides}
                if fit:
                    budget_tokens = spec.budget if spec.budget_kind == "tokens" else spec.budget * config.train.tokens_per_step
                    dotted["train.t_max_tokens"] = budget_tokens
                    try:
                        config = base.with_overrides(dict(dotted))
                    except ConfigError as exc:
                        raise ConfigError(f"{exc} (fit_schedule set train.t_max_tokens={budget_tokens}, the budget; "
                                          "raise the budget, lower train.warmup_tokens in `overrides`, or set "
                                          "fit_schedule: false)") from None
                if spec.same_init:  # one init per seed: the seed the member resolved to
                    init_from = study_dir / "init" / f"seed{config.train.seed}"
                    dotted["checkpoint.init_from"] = str(init_from)
                    config = base.with_overrides(dict(dotted))
            except ConfigError as exc:
                raise StudyError(f"{where}: {exc}") from None
            nproc = member.nproc or spec.nproc or config.parallel.smallest_world_size
            try:
                config.validate_world_size(nproc, backend=backend)
            except ConfigError as exc:
                raise StudyError(f"{where} on {nproc} processes: {exc}; set the member's `nproc` or "
                                 "the study's launch.nproc") from None
            members.append(MemberPlan(name=name, recipe=member.recipe, seed=config.train.seed, overrides=dotted,
                                      nproc=nproc, dir=member_dir, config=config, init_from=init_from))
    _check_shared(members, spec)
    if spec.same_init:
        _check_same_model(members, spec)
    return StudyPlan(spec=spec, dir=study_dir, members=tuple(members))


def _section_differences(a: MemberPlan, b: MemberPlan, section: str) -> str:
    """'section.key: x vs y; ...' (the first three) of two members' config sections; '' if equal."""
    diff = _differences(getattr(a.config, section).to_dict(), getattr(b.config, section).to_dict())
    return "; ".join(f"{section}.{d}" for d in diff[:3])


def _check_shared(members: list[MemberPlan], spec: StudySpec) -> None:
    """The same data order, held-out sets and budget for every member."""
    first = members[0]
    for member in members[1:]:
        for section in ("data", "eval"):
            diff = _section_differences(first, member, section)
            if diff:
                raise StudyError(
                    f"{spec.source}: members {first.name!r} and {member.name!r} differ in {section} ({diff}): a "
                    f"study gives every member the same data order and held-out sets; set {section}.* in the "
                    "shared `overrides` (or `eval`)")
        if member.config.train.seq_length != first.config.train.seq_length:
            raise StudyError(
                f"{spec.source}: members {first.name!r} and {member.name!r} train on sequences of "
                f"{first.config.train.seq_length} and {member.config.train.seq_length} tokens, which changes "
                "the data order; set train.seq_length in the shared `overrides`")
        if spec.budget_kind == "steps" and member.config.train.tokens_per_step != first.config.train.tokens_per_step:
            raise StudyError(
                f"{spec.where('steps')}: steps={spec.budget} gives {first.name!r} "
                f"{spec.budget * first.config.train.tokens_per_step} tokens and {member.name!r} "
                f"{spec.budget * member.config.train.tokens_per_step}; use `tokens:` for one token budget")


def _check_same_model(members: list[MemberPlan], spec: StudySpec) -> None:
    """same_init: the members that share an init have one model and one precision."""
    first_of: dict[Path, MemberPlan] = {}
    for member in members:
        first = first_of.setdefault(member.init_from, member)
        for section in ("model", "precision"):
            diff = _section_differences(first, member, section)
            if diff:
                raise StudyError(
                    f"{spec.where('same_init')}: same_init gives members {first.name!r} and {member.name!r} one set "
                    f"of initial weights, but their {section} differs ({diff}); set same_init: false, or give "
                    f"every member the same {section} (shared `overrides`)")


# ------------------------------------------------------------------ writing and reading
def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def member_started(member_dir: Path) -> bool:
    """Whether a member has left anything behind (a checkpoint, metrics or its done marker)."""
    return any((member_dir / name).exists() for name in ("checkpoints", "metrics.jsonl", "done.json"))


def _check_against_existing(plan: StudyPlan) -> None:
    path = plan.dir / "plan.json"
    if not path.is_file():
        return
    old = {m["name"]: m for m in json.loads(path.read_text()).get("members", [])}
    for member in plan.members:
        before = old.get(member.name)
        if before is None or not member_started(member.dir):
            continue
        diff = _differences(before["config"], member.config.to_dict())
        if diff:
            raise StudyError(
                f"{plan.spec.source}: member {member.name!r} has already run in {plan.dir} with another config "
                f"({'; '.join(diff[:3])}); resuming it would mix two runs: give the study a new directory "
                f"(--dir) or remove {member.dir}")


def write_plan(plan: StudyPlan) -> Path:
    """Writes the member files, sweep.txt and (last) plan.json, each atomically; returns plan.json.

    A study directory that does not exist yet is built beside it and renamed into place, so an
    interrupted write leaves no study directory at all. A member that already ran must keep its
    config (StudyError otherwise)."""
    _check_against_existing(plan)
    target = plan.dir
    fresh = not target.exists()
    if fresh:
        target.parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.")) if fresh else target

    def at(path: Path) -> Path:
        return root / path.relative_to(target)

    try:
        for member in plan.members:
            _atomic_write(at(member.member_file), yaml.safe_dump(member.overrides, sort_keys=False))
        _atomic_write(at(target / "sweep.txt"), "".join(m.sweep_line() + "\n" for m in plan.members))
        _atomic_write(at(target / "plan.json"), json.dumps(plan.to_dict(), indent=1) + "\n")
        if fresh:
            os.rename(root, target)
    except BaseException:
        if fresh:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
        raise
    return target / "plan.json"


def read_plan(study_dir: str | Path) -> dict[str, Any]:
    """plan.json of a study directory; StudyError if there is none."""
    path = Path(study_dir) / "plan.json"
    if not path.is_file():
        raise StudyError(f"{study_dir} holds no plan.json; run `olmoe study run STUDY.yaml --dir {study_dir}` "
                         "(or `olmoe study plan`) first")
    return json.loads(path.read_text())
