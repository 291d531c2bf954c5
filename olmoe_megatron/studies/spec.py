"""The study file: a YAML description of a set of training runs compared at one token budget.

    name: granularity
    description: finer experts at equal active and total parameters (paper section 4.1)
    tokens: 2_048_000            # or `steps: 500`: the one budget of every member
    seeds: [1234]                # train.seed (model init): one member per recipe x variant x seed
    data_seed: 6198              # data.seed (data order), the same for every member
    fit_schedule: true           # train.t_max_tokens = the budget's tokens (cosine ends at the budget)
    overrides: {precision.dtype: fp32}        # shared: applied to every member
    eval: {interval: 100, datasets: [{name: heldout, share: 0.01}]}   # EvalConfig, the same for all
    launch: {nproc: 1}           # local processes per member (default: the layout's smallest world)
    loss_tolerance: 1.0e-4       # optional: per-step train losses must agree to this (layout studies)
    same_init: true              # optional: every member starts from one set of initial weights per seed
    recipes: [ablation_8e_top1, ablation_64e_top8]
    variants: {base: {}, lr2e-3: {train.lr: 2.0e-3}}   # optional: crossed with `recipes`

or, instead of `recipes`/`variants`, explicit members:

    members:
      - {name: coarse, recipe: ablation_8e_top1}
      - {name: fine-ep2, recipe: ablation_64e_top8, overrides: [--parallel.expert_parallel=2], nproc: 2}

Overrides are a mapping of dotted keys to values or a list of `--section.field=value` strings, as on
the command line. Errors name the file and line, the value and the fix; nothing here touches disk
besides reading the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from olmoe_megatron.config import ConfigError
from olmoe_megatron.config.base import safe_load_unique

#: The keys a study file may hold, each with what it means (also the error message's list).
TOP_KEYS = {
    "name": "the study's name (the default study directory is runs/studies/<name>)",
    "description": "one line saying what the study compares",
    "tokens": "token budget of every member: train.max_tokens, train.max_steps null",
    "steps": "step budget of every member (all members must train the same tokens per step)",
    "seeds": "list of train.seed values (model init); each member runs once per seed",
    "data_seed": "data.seed (data order) for every member",
    "fit_schedule": "true (default): train.t_max_tokens = the budget's tokens",
    "overrides": "overrides applied to every member",
    "eval": "EvalConfig fields applied to every member (the same held-out sets for all)",
    "launch": "{nproc: N}: local processes per member",
    "loss_tolerance": "per-step train losses of all members must agree to this (layout studies)",
    "same_init": "true: every member of a seed starts from the same initial weights, written once (layout studies)",
    "recipes": "recipe names crossed with `variants` (or give `members`)",
    "variants": "named override sets crossed with `recipes`",
    "members": "explicit members: [{name, recipe, overrides, nproc}]",
}
MEMBER_KEYS = ("name", "recipe", "overrides", "nproc")
LAUNCH_KEYS = ("nproc",)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class StudyError(ConfigError):
    """A study file breaks a rule; the message names the file, the line, the value and the fix."""


@dataclasses.dataclass(frozen=True)
class MemberSpec:
    """One member before seeds are applied: a recipe and its own overrides."""

    name: str
    recipe: str
    overrides: dict[str, Any]
    nproc: int | None
    where: str
    """'file:line' of the member's entry, for error messages."""


@dataclasses.dataclass(frozen=True)
class StudySpec:
    """A parsed study file (values checked for shape; run configs are resolved by plan.py)."""

    name: str
    description: str
    budget_kind: str
    """'tokens' or 'steps'."""
    budget: int
    seeds: tuple[int, ...]
    data_seed: int | None
    fit_schedule: bool
    overrides: dict[str, Any]
    eval: dict[str, Any]
    nproc: int | None
    loss_tolerance: float | None
    members: tuple[MemberSpec, ...]
    source: str
    lines: dict[tuple, int]
    """(key path) -> line of the file, for messages that point into it."""
    same_init: bool = False
    """Every member of a seed loads one set of initial weights (written once, in a world of one
    process, by `olmoe study init`) instead of drawing its own: layouts that initialise differently
    (Megatron seeds experts per EP rank and each pipeline stage on its own stream) then start equal."""

    def where(self, *path: Any) -> str:
        """'file:line' of the deepest known prefix of `path`."""
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return f"{self.source}:{self.lines[path[:end]]}"
        return self.source


def _line_index(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Every mapping key's and sequence item's 1-based line, by its key path."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[path + (key,)] = key_node.start_mark.line + 1
            _line_index(value_node, path + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            out[path + (index,)] = item.start_mark.line + 1
            _line_index(item, path + (index,), out)
    return out


def _unknown(where: str, what: str, key: Any, allowed) -> StudyError:
    close = difflib.get_close_matches(str(key), list(allowed), n=2)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return StudyError(f"{where}: unknown {what} key {key!r}; {hint}valid keys: {', '.join(allowed)}")


def normalize_overrides(value: Any, *, where: str) -> dict[str, Any]:
    """A mapping of dotted keys to values, from a mapping or a list of `--key=value` strings.

    String values are read as YAML, as the command line reads them (`--train.lr=1e-3`)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = []
        for entry in value:
            if not isinstance(entry, str) or "=" not in entry:
                raise StudyError(f"{where}: override {entry!r} must be a string --section.field=value "
                                 "(or write the overrides as a mapping {section.field: value})")
            key, text = entry.removeprefix("--").split("=", 1)
            items.append((key.strip(), text))
    else:
        raise StudyError(f"{where}: overrides={value!r} must be a mapping {{section.field: value}} or a list "
                         "of --section.field=value strings")
    out: dict[str, Any] = {}
    for key, item in items:
        if not isinstance(key, str) or not key or key.startswith("-"):
            raise StudyError(f"{where}: override key {key!r} must be a dotted field name such as train.lr")
        if isinstance(item, str) and item != "":
            loaded = yaml.safe_load(item)
            item = item if isinstance(loaded, str) else loaded
        out[key] = item
    return out


def _positive_int(value: Any, *, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StudyError(f"{where}: {key}={value!r} must be a positive integer")
    return value


def _check_name(name: Any, *, where: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise StudyError(f"{where}: {what}={name!r} must be a name of letters, digits and _.+- "
                         "(it becomes a directory)")
    return name


def parse_study(path: str | Path) -> StudySpec:
    """Reads and checks a study file; raises StudyError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file {str(path)!r} does not exist; see `olmoe study list` for the built-in ones")
    text = path.read_text()
    source = str(path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = safe_load_unique(text, source=source)
    except yaml.YAMLError as exc:
        raise StudyError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise StudyError(f"{source}: a study file holds a mapping (name, tokens, recipes or members, ...)")
    lines = _line_index(node) if node is not None else {}

    def where(*key_path: Any) -> str:
        for end in range(len(key_path), -1, -1):
            if key_path[:end] in lines:
                return f"{source}:{lines[key_path[:end]]}"
        return source

    for key in data:
        if key not in TOP_KEYS:
            raise _unknown(where(key), "study", key, TOP_KEYS)
    name = _check_name(data.get("name", path.stem), where=where("name"), what="name")
    if ("tokens" in data) == ("steps" in data):
        raise StudyError(f"{where()}: give exactly one budget, `tokens: N` (train.max_tokens) or `steps: N` "
                         "(train.max_steps)")
    budget_kind = "tokens" if "tokens" in data else "steps"
    budget = _positive_int(data[budget_kind], where=where(budget_kind), key=budget_kind)
    seeds = data.get("seeds", [])
    if not isinstance(seeds, list) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise StudyError(f"{where('seeds')}: seeds={seeds!r} must be a list of integers >= 0, e.g. [1234, 1235]")
    if len(set(seeds)) != len(seeds):
        raise StudyError(f"{where('seeds')}: seeds={seeds!r} repeats a seed; give each once")
    data_seed = data.get("data_seed")
    if data_seed is not None and (isinstance(data_seed, bool) or not isinstance(data_seed, int) or data_seed < 0):
        raise StudyError(f"{where('data_seed')}: data_seed={data_seed!r} must be an integer >= 0")
    fit_schedule = data.get("fit_schedule", True)
    if not isinstance(fit_schedule, bool):
        raise StudyError(f"{where('fit_schedule')}: fit_schedule={fit_schedule!r} must be true or false")
    overrides = normalize_overrides(data.get("overrides"), where=where("overrides"))
    eval_section = data.get("eval") or {}
    if not isinstance(eval_section, dict):
        raise StudyError(f"{where('eval')}: eval must be a mapping of EvalConfig fields, e.g. "
                         "{interval: 100, datasets: [{name: heldout, share: 0.01}]}")
    launch = data.get("launch") or {}
    if not isinstance(launch, dict):
        raise StudyError(f"{where('launch')}: launch must be a mapping such as {{nproc: 2}}")
    for key in launch:
        if key not in LAUNCH_KEYS:
            raise _unknown(where("launch", key), "launch", key, LAUNCH_KEYS)
    nproc = _positive_int(launch["nproc"], where=where("launch", "nproc"), key="launch.nproc") if "nproc" in launch else None
    tolerance = data.get("loss_tolerance")
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0):
        raise StudyError(f"{where('loss_tolerance')}: loss_tolerance={tolerance!r} must be a number >= 0, e.g. 1.0e-4")

    same_init = data.get("same_init", False)
    if not isinstance(same_init, bool):
        raise StudyError(f"{where('same_init')}: same_init={same_init!r} must be true or false")

    members = _members(data, where=where)
    return StudySpec(
        name=name, description=str(data.get("description", "")), budget_kind=budget_kind, budget=budget,
        seeds=tuple(seeds), data_seed=data_seed, fit_schedule=fit_schedule, overrides=overrides,
        eval=eval_section, nproc=nproc, loss_tolerance=None if tolerance is None else float(tolerance),
        members=members, source=source, lines=lines, same_init=same_init,
    )


def _members(data: dict, *, where) -> tuple[MemberSpec, ...]:
    has_members, has_recipes = "members" in data, "recipes" in data
    if has_members == has_recipes:
        raise StudyError(f"{where()}: give either `members: [{{name, recipe, overrides}}]` or "
                         "`recipes: [...]` (optionally with `variants: {{name: overrides}}`), not "
                         f"{'both' if has_members else 'neither'}")
    if "variants" in data and not has_recipes:
        raise StudyError(f"{where('variants')}: `variants` are crossed with `recipes`; with `members`, give "
                         "each member its own overrides")
    out: list[MemberSpec] = []
    if has_members:
        entries = data["members"]
        if not isinstance(entries, list) or not entries:
            raise StudyError(f"{where('members')}: members must be a non-empty list of {{name, recipe, overrides}}")
        for index, entry in enumerate(entries):
            at = where("members", index)
            if not isinstance(entry, dict):
                raise StudyError(f"{at}: a member is a mapping {{name, recipe, overrides, nproc}}, got {entry!r}")
            for key in entry:
                if key not in MEMBER_KEYS:
                    raise _unknown(where("members", index, key), "member", key, MEMBER_KEYS)
            if "recipe" not in entry:
                raise StudyError(f"{at}: member {entry.get('name', index)!r} has no recipe; add `recipe: NAME` "
                                 "(see `olmoe recipes`)")
            recipe = _check_name(entry["recipe"], where=where("members", index, "recipe"), what="recipe")
            name = _check_name(entry.get("name", recipe), where=where("members", index, "name"), what="member name")
            nproc = entry.get("nproc")
            if nproc is not None:
                nproc = _positive_int(nproc, where=where("members", index, "nproc"), key="nproc")
            overrides = normalize_overrides(entry.get("overrides"), where=where("members", index, "overrides"))
            out.append(MemberSpec(name=name, recipe=recipe, overrides=overrides, nproc=nproc, where=at))
    else:
        recipes = data["recipes"]
        if not isinstance(recipes, list) or not recipes:
            raise StudyError(f"{where('recipes')}: recipes must be a non-empty list of recipe names")
        variants = data.get("variants") or {"": {}}
        if not isinstance(variants, dict):
            raise StudyError(f"{where('variants')}: variants must be a mapping {{name: overrides}}")
        for index, recipe in enumerate(recipes):
            recipe = _check_name(recipe, where=where("recipes", index), what="recipe")
            for variant, overrides in variants.items():
                if variant:
                    _check_name(variant, where=where("variants", variant), what="variant")
                out.append(MemberSpec(
                    name=f"{recipe}-{variant}" if variant else recipe, recipe=recipe,
                    overrides=normalize_overrides(overrides, where=where("variants", variant)), nproc=None,
                    where=where("recipes", index),
                ))
    seen: dict[str, str] = {}
    for member in out:
        if member.name in seen:
            raise StudyError(f"{member.where}: member name {member.name!r} is used twice (also {seen[member.name]}); "
                             "give each member its own `name`")
        seen[member.name] = member.where
    return tuple(out)
