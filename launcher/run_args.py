"""Shared `--recipe / --config / --section.field=value` handling of the run commands."""

from __future__ import annotations

import argparse
from typing import Any

from olmoe_megatron.config import ConfigError
from olmoe_megatron.config.base import parse_override_args, read_yaml_mapping
from olmoe_megatron.recipes import get_recipe
from olmoe_megatron.run_config import RunConfig


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default=None, help="a recipe name (see `olmoe recipes`)")
    parser.add_argument("--config", default=None, help="a YAML run file applied over the recipe")
    parser.epilog = "Any config field can be overridden as --section.field=value, e.g. --train.lr=4e-4."
    parser.set_defaults(_accepts_overrides=True)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resolve_run_config(args: argparse.Namespace) -> RunConfig:
    """recipe (or defaults) <- YAML file <- dotted overrides, validated once as a whole.

    The file and the flags are applied together, so a rule that spans both (a file setting
    parallel.tensor_parallel=2, a flag setting parallel.sequence_parallel=true) is judged on the
    result; an error that the file alone already causes names the file.
    """
    if args.recipe is None and args.config is None:
        raise ConfigError("give --recipe NAME (see `olmoe recipes`) and/or --config run.yaml")
    run_config = get_recipe(args.recipe) if args.recipe else RunConfig()
    from_file = _flatten(read_yaml_mapping(args.config)) if args.config else {}
    from_flags = parse_override_args(list(getattr(args, "overrides", None) or []))
    if not from_file and not from_flags:
        return run_config
    try:
        return run_config.with_overrides({**from_file, **from_flags})
    except ConfigError as exc:
        if from_file:
            try:
                run_config.with_overrides(from_file)
            except ConfigError as file_exc:
                if str(file_exc) == str(exc):
                    raise ConfigError(f"{args.config}: {exc}") from None
        raise
