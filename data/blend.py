"""Weighted blends: which source and which of its samples each global sample index reads.

Uses Megatron-Core's compiled `build_blending_indices` (the same greedy error-minimising schedule
as its BlendedDataset) and the same per-source sizes as BlendedMegatronDatasetBuilder, so a
Megatron-order blend reproduces Megatron's sample order; the arrays are cached under a lock.
"""

from __future__ import annotations

import math
import os

import numpy as np

from olmoe_megatron.data.errors import DataError
from olmoe_megatron.data.index_cache import cached_arrays

# BlendedMegatronDatasetBuilder's default mid_level_dataset_surplus.
MID_LEVEL_SURPLUS = 0.005


def normalize_weights(weights: list[float] | tuple[float, ...]) -> list[float]:
    """Weights scaled to sum to 1 (as Megatron's `normalize`)."""
    array = np.array(weights, dtype=np.float64)
    return (array / array.sum()).tolist()


def samples_per_source(weights: list[float], num_samples: int, *, surplus: float = 0.0) -> list[int]:
    """Samples to build per source: ceil(ceil(num_samples * w) * (1 + surplus)) as Megatron does."""
    return [int(math.ceil(math.ceil(num_samples * w) * (1 + surplus))) for w in normalize_weights(weights)]


def blend_indices(weights: list[float], num_samples: int, *, description: dict,
                  index_cache_dir: str | os.PathLike,
                  source_lengths: list[int]) -> tuple[np.ndarray, np.ndarray, int]:
    """(source index, sample index within the source, blend size) for a weighted blend.

    The blend covers sum(ceil(num_samples * w)) >= num_samples samples, Megatron's target size.

    Raises:
        DataError: the blend would read past the end of a source.
    """
    normalized = normalize_weights(weights)
    size = sum(samples_per_source(weights, num_samples))

    def build() -> dict[str, np.ndarray]:
        from megatron.core.datasets import helpers

        dataset_index = np.zeros(size, dtype=np.int16)
        dataset_sample_index = np.zeros(size, dtype=np.int64)
        helpers.build_blending_indices(dataset_index, dataset_sample_index, normalize_weights(normalized),
                                       len(normalized), size, False)
        counts = np.bincount(dataset_index, minlength=len(normalized))
        for source_id, (count, length) in enumerate(zip(counts, source_lengths)):
            if count > length:
                raise DataError(f"blend source {source_id} ({description.get('sources', ['?'] * (source_id + 1))[source_id]}) "
                                f"would be read {int(count)} times but indexes only {length} samples")
        return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}

    arrays = cached_arrays(index_cache_dir, kind="blend",
                           description={**description, "weights": normalized, "size": size},
                           names=("dataset_index", "dataset_sample_index"), build=build)
    return arrays["dataset_index"], arrays["dataset_sample_index"], size
