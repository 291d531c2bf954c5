"""The held-out share of a training source: a fixed subset of its documents (OLMo order: windows).

The subset is chosen by a seed of its own, not `data.seed`, so a new data order (an anneal's new
seed) keeps the same held-out documents and the validation loss stays comparable across phases.
Training reads the kept items only; evaluation (olmoe_megatron/evaluation/sources.py) reads the
held-out ones.
"""

from __future__ import annotations

import numpy as np

from olmoe_megatron.config import ConfigError

HELDOUT_SEED = 20240902  # OLMoE's arXiv date; fixed so every run holds out the same items


def heldout_items(num_items: int, share: float, *, source: str, unit: str = "documents") -> np.ndarray:
    """Sorted indices of the `share` of `num_items` items held out of training (int64).

    Raises:
        ConfigError: the share would hold out nothing, or leave the source with nothing to train on.
    """
    count = int(round(share * num_items))
    if count < 1:
        raise ConfigError(
            f"eval.datasets share={share} holds out no item of {source}, which has {num_items} {unit}; "
            f"raise the share to at least {1 / max(num_items, 1):.3g} or evaluate on separate files")
    if count >= num_items:
        raise ConfigError(
            f"eval.datasets share={share} would hold out all {num_items} {unit} of {source}, leaving that "
            f"training source empty; lower the share (e.g. 0.01) or give more data")
    rng = np.random.Generator(np.random.PCG64(HELDOUT_SEED))
    return np.sort(rng.choice(num_items, size=count, replace=False)).astype(np.int64)


def kept_items(num_items: int, share: float, *, source: str, unit: str = "documents") -> np.ndarray:
    """Sorted indices of the items training may draw: all but `heldout_items` (all when share is 0)."""
    if share == 0:
        return np.arange(num_items, dtype=np.int64)
    keep = np.ones(num_items, dtype=bool)
    keep[heldout_items(num_items, share, source=source, unit=unit)] = False
    return np.flatnonzero(keep).astype(np.int64)
