"""Data mixtures: OLMoE-Mix-0924's source proportions over the user's own token files (run recipes are
olmoe_megatron/recipes.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from olmoe_megatron.config import ConfigError
from olmoe_megatron.data.config import DataConfig

# OLMoE-Mix-0924 tokens per source, in billions (OLMoE paper, Table 10).
OLMOE_MIX_0924_TOKENS_B: dict[str, float] = {
    "dclm": 3860.0,
    "starcoder": 101.0,
    "pes2o": 57.2,
    "arxiv": 21.1,
    "openwebmath": 12.7,
    "algebraic_stack": 12.6,
    "wikipedia": 3.69,
}


def olmoe_mix(paths: Mapping[str, str | Sequence[str]], **overrides: Any) -> DataConfig:
    """A DataConfig blending the given sources in OLMoE-Mix-0924's proportions.

    Args:
        paths: Source name (keys of OLMOE_MIX_0924_TOKENS_B) -> its token file(s). A source's weight
            is split evenly over its files; pass one tokenize manifest per source to weigh by tokens.
            Sources left out are dropped and the rest renormalised.
        **overrides: Other DataConfig fields (format, order, seed, cache_dir, ...). Defaults: the
            released mix's format (OLMo .npy) and OLMo's order.

    Returns:
        The DataConfig.

    Raises:
        ConfigError: an unknown source name or a source without files.
    """
    unknown = sorted(set(paths) - set(OLMOE_MIX_0924_TOKENS_B))
    if unknown:
        raise ConfigError(f"olmoe_mix: unknown source {unknown[0]!r}; sources are "
                          f"{', '.join(OLMOE_MIX_0924_TOKENS_B)}")
    all_paths: list[str] = []
    weights: list[float] = []
    for source, tokens_b in OLMOE_MIX_0924_TOKENS_B.items():
        if source not in paths:
            continue
        files = [paths[source]] if isinstance(paths[source], str) else list(paths[source])
        if not files:
            raise ConfigError(f"olmoe_mix: source {source!r} has no files; give at least one path or leave it out")
        all_paths.extend(files)
        weights.extend([tokens_b / len(files)] * len(files))
    settings: dict[str, Any] = {"format": "olmo_npy", "order": "olmo", **overrides}
    return DataConfig(paths=tuple(all_paths), weights=tuple(weights), **settings)
