"""MicroBatchIterator: one data-parallel rank's micro-batches of each global batch.

Global batch b holds global samples [c, c + global_batch_size) where c is the consumed-sample count
before it, so the order of samples is a function of the dataset alone, not of the DP size. DP rank
r takes the contiguous slice [c + r*n, c + (r+1)*n) with n = global_batch_size / dp_size and splits
it into micro-batches. Resuming is constructing with the saved `consumed_samples`: nothing replays.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from olmoe_megatron.config import ConfigError

logger = logging.getLogger(__name__)


def _divisible_suggestions(global_batch_size: int, micro_batch_size: int, dp_size: int) -> str:
    unit = micro_batch_size * dp_size
    lower = max(unit, global_batch_size // unit * unit)
    options = sorted({lower, lower + unit})
    divisors = [m for m in range(1, micro_batch_size + 1) if global_batch_size % (m * dp_size) == 0]
    text = f"global_batch_size={' or '.join(map(str, options))}"
    if divisors:
        text += f", or micro_batch_size={divisors[-1]}"
    return text


class MicroBatchIterator:
    """Yields, per global batch, this DP rank's list of micro-batches (dicts of torch tensors).

    Each micro-batch has `tokens` int64 [mbs, S], `labels` int64 [mbs, S], `loss_mask` float32
    [mbs, S] and `position_ids` int64 [mbs, S].

    Args:
        dataset: Map-style dataset whose items are dicts of numpy arrays (e.g. TokenDataset).
        global_batch_size: Samples per optimizer step over all DP ranks.
        micro_batch_size: Samples per forward/backward on one rank.
        dp_rank: This rank's data-parallel index.
        dp_size: Data-parallel world size.
        consumed_samples: Global samples already consumed (to resume).

    Raises:
        ConfigError: global_batch_size not divisible by micro_batch_size * dp_size, or bad ranks.
    """

    def __init__(self, dataset, *, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0) -> None:
        for name, value in (("global_batch_size", global_batch_size), ("micro_batch_size", micro_batch_size),
                            ("dp_size", dp_size)):
            if value < 1:
                raise ConfigError(f"{name}={value} must be >= 1")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ConfigError(
                f"global_batch_size={global_batch_size} must be divisible by micro_batch_size={micro_batch_size} "
                f"* dp_size={dp_size} = {micro_batch_size * dp_size}; try "
                f"{_divisible_suggestions(global_batch_size, micro_batch_size, dp_size)}"
            )
        if not 0 <= dp_rank < dp_size:
            raise ConfigError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if consumed_samples < 0 or consumed_samples % global_batch_size:
            raise ConfigError(f"consumed_samples={consumed_samples} must be a non-negative multiple of "
                              f"global_batch_size={global_batch_size} (it counts whole global batches)")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per global batch on each rank."""
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    @property
    def num_global_batches(self) -> int:
        """Global batches left in the dataset."""
        return max(0, (len(self.dataset) - self.consumed_samples) // self.global_batch_size)

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        consumed = int(state["consumed_samples"])
        if consumed < 0 or consumed % self.global_batch_size:
            raise ConfigError(f"consumed_samples={consumed} in the loaded state is not a multiple of "
                              f"global_batch_size={self.global_batch_size}; the run changed its batch size")
        self.consumed_samples = consumed

    def rank_sample_indices(self, consumed_samples: int) -> range:
        """Global sample indices this rank reads in the global batch starting at `consumed_samples`."""
        per_rank = self.global_batch_size // self.dp_size
        start = consumed_samples + self.dp_rank * per_rank
        return range(start, start + per_rank)

    def __iter__(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        while self.consumed_samples + self.global_batch_size <= len(self.dataset):
            indices = self.rank_sample_indices(self.consumed_samples)
            micro_batches = [self._collate(indices[i:i + self.micro_batch_size])
                             for i in range(0, len(indices), self.micro_batch_size)]
            self.consumed_samples += self.global_batch_size
            yield micro_batches

    def _collate(self, indices: range) -> dict[str, torch.Tensor]:
        samples = [self.dataset[i] for i in indices]
        batch = {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in ("tokens", "labels", "loss_mask")}
        seq_length = batch["tokens"].shape[1]
        batch["position_ids"] = torch.arange(seq_length, dtype=torch.int64).unsqueeze(0).expand(len(samples), -1).contiguous()
        return batch
