"""Config machinery shared by every concern: frozen dataclasses, dotted overrides, YAML."""

from olmoe_megatron.config.base import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    divisors,
    load_yaml,
    one_of,
    parse_override_args,
)

__all__ = [
    "Config",
    "ConfigError",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "divisors",
    "load_yaml",
    "one_of",
    "parse_override_args",
]
