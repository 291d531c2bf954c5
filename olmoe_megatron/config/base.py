"""Frozen keyword-only config dataclasses, dotted overrides and YAML round trips.

Every concern (model, parallel layout, training, data) owns one `Config` subclass. Configs are
immutable values: `replace()` returns a new one and re-runs validation. Unknown keys are errors,
never silently dropped, and every error names the field, the value, the rule and a fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A config value breaks a rule. The message names the field, the value, the rule and a fix."""


def divisors(n: int) -> list[int]:
    """The positive divisors of n, ascending (the values a "must divide" rule allows)."""
    return [d for d in range(1, n + 1) if n % d == 0]


def one_of(options: list[int]) -> str:
    """'1, 2 or 4': a readable list of allowed values for an error message."""
    if not options:
        return "none"
    if len(options) == 1:
        return str(options[0])
    return ", ".join(map(str, options[:-1])) + " or " + str(options[-1])


@dataclasses.dataclass(kw_only=True, frozen=True)
class Config:
    """Base of every config: validation on construction, dict/YAML round trips, dotted overrides."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Checks the rules of this concern; raises ConfigError. Subclasses extend it."""

    def replace(self: C, **changes: Any) -> C:
        """A copy with `changes` applied (validated again)."""
        names = {f.name for f in dataclasses.fields(self)}
        for key in changes:
            if key not in names:
                raise ConfigError(_unknown_key_message(type(self), key, prefix=""))
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        return config_from_dict(cls, data)

    def with_overrides(self: C, overrides: list[str] | dict[str, Any]) -> C:
        return apply_overrides(self, overrides)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of a config (tuples become lists, so it dumps as YAML/JSON)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, Config):
            value = config_to_dict(value)
        elif isinstance(value, tuple):
            value = [config_to_dict(v) if isinstance(v, Config) else v for v in value]
        out[f.name] = value
    return out


def _unknown_key_message(cls: type, key: str, *, prefix: str) -> str:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=3)
    hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
    return (
        f"unknown config key {prefix + key!r} for {cls.__name__}{hint} "
        f"Valid keys: {', '.join(names)}"
    )


def _coerce(value: Any, annotation: Any, *, path: str) -> Any:
    """Converts `value` (from YAML or a command line string) to `annotation`, or raises."""
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(annotation)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in options:
                return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, path=path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{path}={value!r} does not fit {annotation}: " + "; ".join(errors))
    if origin is Literal:
        choices = get_args(annotation)
        if value in choices:
            return value
        raise ConfigError(f"{path}={value!r} must be one of {', '.join(map(repr, choices))}")
    if origin in (tuple, list):
        args = get_args(annotation)
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[]()").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r} must be a list")
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, path=f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if isinstance(annotation, type) and issubclass(annotation, Config):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping of {annotation.__name__} fields, got {value!r}")
        return config_from_dict(annotation, value, prefix=path + ".")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{path}={value!r} must be true or false")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} must be an integer")
        if isinstance(value, int):
            return value
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}={value!r} must be an integer") from None
        if not math.isfinite(as_float):
            raise ConfigError(f"{path}={value!r} must be a finite integer (it reads as {as_float}), e.g. 1000")
        if as_float != int(as_float):
            raise ConfigError(f"{path}={value!r} must be an integer")
        return int(as_float)
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} must be a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}={value!r} must be a number") from None
        if not math.isfinite(number):
            raise ConfigError(f"{path}={value!r} must be a finite number (it reads as {number}), e.g. 4e-4")
        return number
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}={value!r} must be a string")
    return value


def config_from_dict(cls: type[C], data: dict[str, Any], *, prefix: str = "") -> C:
    """Builds `cls` from a nested dict; unknown keys and ill-typed values raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(_unknown_key_message(cls, key, prefix=prefix))
        kwargs[key] = _coerce(value, hints[key], path=prefix + key)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{cls.__name__} ({prefix.rstrip('.') or 'root'}): {exc}") from None


def parse_override_args(args: list[str]) -> dict[str, str]:
    """`['--model.num_experts=32', 'train.lr=4e-4']` -> {'model.num_experts': '32', ...}."""
    out: dict[str, str] = {}
    for arg in args:
        text = arg[2:] if arg.startswith("--") else arg
        if "=" not in text:
            raise ConfigError(
                f"override {arg!r} has no value; write it as --section.field=value "
                f"(for example --model.num_experts=32)"
            )
        key, value = text.split("=", 1)
        out[key.strip()] = value
    return out


def apply_overrides(cfg: C, overrides: list[str] | dict[str, Any]) -> C:
    """Applies dotted overrides (`model.num_experts=32`) to a config and validates the result."""
    if isinstance(overrides, list):
        overrides = parse_override_args(overrides)
    data = config_to_dict(cfg)
    for dotted, value in overrides.items():
        node: Any = data
        cls: Any = type(cfg)
        parts = dotted.split(".")
        for depth, part in enumerate(parts):
            names = {f.name for f in dataclasses.fields(cls)}
            if part not in names:
                raise ConfigError(_unknown_key_message(cls, part, prefix=".".join(parts[:depth]) + ("." if depth else "")))
            if depth == len(parts) - 1:
                node[part] = yaml.safe_load(value) if isinstance(value, str) and value != "" else value
                if isinstance(node[part], str) and value != node[part]:
                    node[part] = value
            else:
                nested = typing.get_type_hints(cls)[part]
                if not (isinstance(nested, type) and issubclass(nested, Config)):
                    raise ConfigError(f"{'.'.join(parts[:depth + 1])} is a value, not a section; cannot set {dotted}")
                node = node[part]
                cls = nested
    return config_from_dict(type(cfg), data)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with a key given twice (PyYAML keeps the last)."""

    source = "<yaml>"

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: SafeLoader raises its own error for it
                continue
            if first != line:
                raise ConfigError(f"{self.source}:{line}: key {key!r} is given twice (first at line {first}); "
                                  "YAML would silently keep the last one: keep one of them")
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(text: str, *, source: str = "<yaml>") -> Any:
    """yaml.safe_load, except that a key given twice in one mapping raises ConfigError naming
    source:line (a YAML run file where the later value would otherwise silently win)."""
    loader = type("_Loader", (_UniqueKeyLoader,), {"source": source})
    return yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader subclass


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file; a missing file, bad YAML or a non-mapping raise ConfigError."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; give the YAML run file (e.g. {path}/run.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = safe_load_unique(path.read_text(), source=str(path)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of config sections")
    return data


def load_yaml(cls: type[C], path: str | Path) -> C:
    """Reads a YAML run file into `cls`; errors name the file."""
    data = read_yaml_mapping(path)
    try:
        return config_from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
