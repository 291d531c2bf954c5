"""OLMo's instance order: fixed windows over concatenated token files, one permutation per epoch.

Each file is cut into non-overlapping `seq_length` windows (its remainder dropped); files are
concatenated in the given order; epoch e visits the windows in the order
`np.random.Generator(np.random.PCG64(seed + e)).permutation(np.arange(n, dtype=np.uint32))`.
Permutations are cached memory-mapped (4 bytes per instance per epoch).
"""

from __future__ import annotations

import os

import numpy as np

from olmoe_megatron.data.heldout import kept_items
from olmoe_megatron.data.index_cache import cached_arrays


def olmo_permutation(num_instances: int, *, seed: int, epoch: int) -> np.ndarray:
    """OLMo's instance order for one epoch."""
    dtype = np.uint32 if num_instances < 2**32 else np.uint64
    rng = np.random.Generator(np.random.PCG64(seed + epoch))
    return rng.permutation(np.arange(num_instances, dtype=dtype))


class OlmoOrderSource:
    """Instances of `seq_length` tokens from token files in OLMo's order.

    Args:
        files: (path, dtype) of each raw token file (.npy or Megatron .bin), in order.
        seq_length: Tokens per instance.
        num_samples: Instances that will be read (sets how many epoch permutations are cached).
        seed: Base seed; epoch e uses seed + e.
        index_cache_dir: Where the permutations are cached.
        heldout_share: Share of the windows held out for evaluation (data/heldout.py); the order
            permutes the kept windows only.
    """

    def __init__(self, files: list[tuple[str, np.dtype]], *, seq_length: int, num_samples: int, seed: int,
                 index_cache_dir: str | os.PathLike, heldout_share: float = 0.0) -> None:
        self.files = [(str(path), np.dtype(dtype)) for path, dtype in files]
        self.seq_length = seq_length
        self.seed = seed
        self._tokens = [np.memmap(path, dtype=dtype, mode="r") for path, dtype in self.files]
        windows = np.array([t.shape[0] // seq_length for t in self._tokens], dtype=np.int64)
        self._first_window = np.concatenate(([0], np.cumsum(windows)))
        self.num_instances = int(self._first_window[-1])
        if self.num_instances == 0:
            from olmoe_megatron.data.errors import DataError

            raise DataError(f"{', '.join(p for p, _ in self.files)}: fewer than seq_length={seq_length} tokens "
                            f"per file, so OLMo's order has no instance; use shorter sequences or more data")
        self.num_tokens = int(sum(t.shape[0] for t in self._tokens))
        # With a held-out share, positions of the permutation index the kept windows.
        self._kept = None
        if heldout_share:
            self._kept = kept_items(self.num_instances, heldout_share, source=", ".join(p for p, _ in self.files),
                                    unit=f"windows of {seq_length} tokens")
            self.num_instances = len(self._kept)
        num_epochs = -(-num_samples // self.num_instances)
        description = {"files": [(os.path.abspath(p), os.path.getsize(p), str(d)) for p, d in self.files],
                       "seq_length": seq_length, "seed": seed}
        if heldout_share:
            description["heldout_share"] = heldout_share
        self._orders = [
            cached_arrays(index_cache_dir, kind="olmo-order", description={**description, "epoch": epoch},
                          names=("order",),
                          build=lambda epoch=epoch: {"order": olmo_permutation(self.num_instances, seed=seed,
                                                                               epoch=epoch)})["order"]
            for epoch in range(num_epochs)
        ]

    def __len__(self) -> int:
        return self.num_instances * len(self._orders)

    def _locate(self, index: int) -> tuple[int, int]:
        epoch, position = divmod(index, self.num_instances)
        instance = int(self._orders[epoch][position])
        if self._kept is not None:
            instance = int(self._kept[instance])
        file_index = int(np.searchsorted(self._first_window, instance, side="right")) - 1
        return file_index, (instance - int(self._first_window[file_index])) * self.seq_length

    def sample(self, index: int) -> np.ndarray:
        """The `seq_length` tokens (int64) of instance `index` (epoch-major) in OLMo's order."""
        file_index, start = self._locate(index)
        return self._tokens[file_index][start:start + self.seq_length].astype(np.int64)

    def describe(self, index: int) -> str:
        file_index, start = self._locate(index)
        return f"{self.files[file_index][0]}, sample {index} (token offset {start})"
