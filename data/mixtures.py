"""Data mixtures: OLMoE-Mix-0924 as OLMoE read it, over the user's own token files (run recipes are
olmoe_megatron/recipes.py).

OLMoE's config (allenai/OLMoE configs/OLMoE-1B-7B-0924.yml) lists the mix's files source by source,
with no weights: OLMo's order cuts every file into fixed windows, concatenates the files in that
order and draws the windows by one PCG64 permutation (data/olmo_order.py), so each source's share
is its share of the tokens. `olmoe_mix` does the same by default; a weighted blend is an explicit
choice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from olmoe_megatron.config import ConfigError
from olmoe_megatron.data.config import DataConfig
from olmoe_megatron.data.errors import DataError

# OLMoE-Mix-0924 tokens per source, in billions (OLMoE paper, Table 10), keyed in the order in
# which OLMoE's config lists the sources' files: algebraic-stack, arxiv, open-web-math, pes2o,
# starcoder, wiki, DCLM.
OLMOE_MIX_0924_TOKENS_B: dict[str, float] = {
    "algebraic_stack": 12.6,
    "arxiv": 21.1,
    "openwebmath": 12.7,
    "pes2o": 57.2,
    "starcoder": 101.0,
    "wikipedia": 3.69,
    "dclm": 3860.0,
}
OLMOE_MIX_0924_ORDER: tuple[str, ...] = tuple(OLMOE_MIX_0924_TOKENS_B)
"""The sources in the order OLMoE concatenates their files."""
PAPER_PROPORTIONS = "paper_proportions"
"""`weights=` value: weigh the sources by OLMOE_MIX_0924_TOKENS_B."""


def olmoe_mix(
    paths: Mapping[str, str | Sequence[str]],
    /,
    *,
    weights: str | Mapping[str, float] | None = None,
    **overrides: Any,
) -> DataConfig:
    """A DataConfig over OLMoE-Mix-0924's sources.

    By default OLMoE's own order: the sources' files concatenated in OLMOE_MIX_0924_ORDER (whatever
    the order of `paths`), each source's files in the order given, no weights, OLMo .npy files in
    OLMo's order (one permutation over all windows), so proportions come from token counts alone.

    Args:
        paths: Source name (keys of OLMOE_MIX_0924_TOKENS_B) -> its token file(s) (OLMo .npy files,
            Megatron prefixes or tokenize manifests, as `data.format` reads them). Sources left out
            are dropped.
        weights: None (default): no weights, as OLMoE. `"paper_proportions"`: the given sources
            weighted by OLMOE_MIX_0924_TOKENS_B; or a mapping source -> weight. A source's weight is
            spread over its files in proportion to their tokens (each file is read for its count),
            and the weights are renormalised over the given sources. With OLMo's order, a weighted
            blend gives every file its own window permutation and picks the file of each sample by
            Megatron's blend schedule (no longer OLMoE's single permutation); with
            `order="megatron"` it is Megatron's blend of GPTDatasets.
        **overrides: Other DataConfig fields (format, order, seed, npy_dtype, cache_dir, ...).
            Defaults: format='olmo_npy', order='olmo'.

    Returns:
        The DataConfig.

    Raises:
        ConfigError: an unknown source, a source without files, bad weights, or paths/weights
            among the overrides.
        DataError: (weighted only) a token file that is missing or unreadable; the message names it.
    """
    unknown = sorted(set(paths) - set(OLMOE_MIX_0924_TOKENS_B))
    if unknown:
        raise ConfigError(f"olmoe_mix: unknown source {unknown[0]!r}; sources are "
                          f"{', '.join(OLMOE_MIX_0924_ORDER)}")
    clash = sorted({"paths", "weights"} & set(overrides))
    if clash:
        raise ConfigError(f"olmoe_mix: {clash[0]}= is not a DataConfig override here; give the files as the "
                          "`paths` mapping and the blend as weights=None, 'paper_proportions' or a mapping")
    files: dict[str, list[str]] = {}
    for source in OLMOE_MIX_0924_ORDER:
        if source not in paths:
            continue
        given = paths[source]
        files[source] = [str(given)] if isinstance(given, (str, Path)) else [str(p) for p in given]
        if not files[source]:
            raise ConfigError(f"olmoe_mix: source {source!r} has no files; give at least one path or leave it out")
    settings: dict[str, Any] = {"format": "olmo_npy", "order": "olmo", **overrides}
    all_paths = tuple(p for source_files in files.values() for p in source_files)
    if weights is None:
        return DataConfig(paths=all_paths, **settings)
    source_weights = _source_weights(weights, list(files))
    file_format = settings["format"]
    npy_dtype = settings.get("npy_dtype", "uint16")
    file_weights: list[float] = []
    for source, source_files in files.items():
        tokens = [_num_tokens(p, file_format, npy_dtype, source=source) for p in source_files]
        total = sum(tokens)
        file_weights.extend(source_weights[source] * t / total for t in tokens)
    return DataConfig(paths=all_paths, weights=tuple(file_weights), **settings)


def _source_weights(weights: str | Mapping[str, float], sources: list[str]) -> dict[str, float]:
    """Weight per given source, normalised over them."""
    if isinstance(weights, str):
        if weights != PAPER_PROPORTIONS:
            raise ConfigError(f"olmoe_mix: weights={weights!r} is not a blend; use None (OLMoE's unweighted "
                              f"order), {PAPER_PROPORTIONS!r} or a mapping source -> weight")
        raw = {s: OLMOE_MIX_0924_TOKENS_B[s] for s in sources}
    else:
        extra = sorted(set(weights) - set(sources))
        if extra:
            raise ConfigError(f"olmoe_mix: weights names source {extra[0]!r}, which has no paths; "
                              f"weigh only the given sources ({', '.join(sources)})")
        missing = [s for s in sources if s not in weights]
        if missing:
            raise ConfigError(f"olmoe_mix: weights has no entry for source {missing[0]!r}; give every source "
                              "in paths a weight")
        raw = {s: float(weights[s]) for s in sources}
        bad = {s: w for s, w in raw.items() if not (math.isfinite(w) and w > 0)}
        if bad:
            source, value = next(iter(bad.items()))
            raise ConfigError(f"olmoe_mix: weights[{source!r}]={value!r} must be a positive finite number; "
                              "leave the source out of paths to drop it")
    total = sum(raw.values())
    return {s: w / total for s, w in raw.items()}


def _num_tokens(path: str, file_format: str, npy_dtype: str, *, source: str) -> int:
    """Tokens in one user path: an OLMo .npy file (size / item size), a Megatron prefix (its .idx)
    or a tokenize manifest (all its shards)."""
    from olmoe_megatron.data.token_files import expand_path, megatron_file, npy_file

    try:
        kind, items = expand_path(str(Path(path).expanduser()), file_format)
        if kind == "olmo_npy":
            return sum(npy_file(item, dtype=npy_dtype, eos_token_id=0, index_cache_dir=None).num_tokens
                       for item in items)
        return sum(megatron_file(item).num_tokens for item in items)
    except (DataError, FileNotFoundError) as exc:
        raise DataError(f"olmoe_mix source {source!r}: {exc}") from None
