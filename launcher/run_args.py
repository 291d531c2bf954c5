"""Shared `--recipe / --config / --section.field=value` handling of the run commands."""

from __future__ import annotations

import argparse
from typing import Any

from olmoe_megatron.config import ConfigError
from olmoe_megatron.config.base import read_yaml_mapping
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
    """recipe (or defaults) <- YAML file <- dotted overrides; every step validated."""
    if args.recipe is None and args.config is None:
        raise ConfigError("give --recipe NAME (see `olmoe recipes`) and/or --config run.yaml")
    run_config = get_recipe(args.recipe) if args.recipe else RunConfig()
    if args.config:
        data = read_yaml_mapping(args.config)
        try:
            run_config = run_config.with_overrides(_flatten(data))
        except ConfigError as exc:
            raise ConfigError(f"{args.config}: {exc}") from None
    overrides = getattr(args, "overrides", None) or []
    if overrides:
        run_config = run_config.with_overrides(list(overrides))
    return run_config
