"""Megatron's sample order: Megatron-Core's GPTDataset over one .bin/.idx, with locked index caches.

GPTDataset builds its document, sample and shuffle indices with the compiled helpers and decides
who builds by `torch.distributed.get_rank() == 0` (no lock; other ranks must wait at a barrier).
We keep its algorithm and file naming (the md5 of its unique description) but route the build
through `index_cache.cached_arrays`: one process builds under a file lock, the others wait and map.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os

import numpy as np

from olmoe_megatron.data.heldout import kept_items
from olmoe_megatron.data.index_cache import cached_arrays
from olmoe_megatron.data.megatron_format import open_indexed_dataset

logger = logging.getLogger(__name__)

_INDEX_NAMES = ("document_index", "sample_index", "shuffle_index")


class TokenIds:
    """The tokenizer stand-in GPTDataset needs: only end-of-document and padding ids, no vocabulary.

    `pad` is -1, an id that never occurs in data, so GPTDataset never masks or rewrites real tokens
    (OLMoE's PAD id 1 could appear in text).
    """

    def __init__(self, eod: int) -> None:
        self.eod = int(eod)
        self.pad = -1
        self.vocab_size = None
        self.unique_identifiers = collections.OrderedDict(**{"class": "TokenIds", "eod": self.eod})


def _gpt_dataset_class():
    """GPTDataset subclass whose index build goes through our locked cache (imported lazily:
    megatron.core takes seconds to import)."""
    from megatron.core.datasets.gpt_dataset import GPTDataset

    class LockedCacheGPTDataset(GPTDataset):
        """GPTDataset whose indices are built once under a file lock and memory-mapped."""

        def __init__(self, *args, index_cache_dir: str, heldout_share: float = 0.0, **kwargs) -> None:
            self._index_cache_dir = index_cache_dir
            self._heldout_share = heldout_share
            super().__init__(*args, **kwargs)

        def _build_document_sample_shuffle_indices(self):
            parent_build = super()._build_document_sample_shuffle_indices

            def build() -> dict[str, np.ndarray]:
                # config.path_to_cache is "": Megatron builds in memory and would log that it cannot
                # save; we save (atomically) ourselves.
                with _silence_megatron_warning("Unable to save"):
                    arrays = parent_build()
                return dict(zip(_INDEX_NAMES, arrays))

            description = {"megatron_description": self.unique_description}
            if self._heldout_share:  # Megatron's description does not name the documents it draws from
                description["heldout_share"] = self._heldout_share
            arrays = cached_arrays(self._index_cache_dir, kind="GPTDataset", description=description,
                                   names=_INDEX_NAMES, build=build)
            return tuple(arrays[name] for name in _INDEX_NAMES)

    return LockedCacheGPTDataset


@contextlib.contextmanager
def _silence_megatron_warning(prefix: str):
    class _DropPrefix(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.getMessage()).startswith(prefix)

    megatron_logger = logging.getLogger("megatron.core.datasets.gpt_dataset")
    drop = _DropPrefix()
    megatron_logger.addFilter(drop)
    try:
        yield
    finally:
        megatron_logger.removeFilter(drop)


class MegatronOrderSource:
    """Samples of `seq_length + 1` tokens from one .bin/.idx prefix in GPTDataset's order.

    Args:
        prefix: The .bin/.idx prefix.
        seq_length: Tokens per sample (each sample reads one extra token for the labels).
        num_samples: Samples to index (epochs are added as Megatron does when the data is short).
        seed: GPTDataset's random_seed.
        eod_token_id: End-of-document id (kept in the cache description, as Megatron does).
        index_cache_dir: Where the index cache lives.
        heldout_share: Share of the documents held out for evaluation (data/heldout.py); the order
            never draws them.
    """

    def __init__(self, prefix: str, *, seq_length: int, num_samples: int, seed: int, eod_token_id: int,
                 index_cache_dir: str | os.PathLike, heldout_share: float = 0.0) -> None:
        from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
        from megatron.core.datasets.utils import Split

        self.prefix = str(prefix)
        indexed = open_indexed_dataset(self.prefix)
        config = GPTDatasetConfig(
            random_seed=seed, sequence_length=seq_length, blend=([self.prefix], None), split="1,0,0",
            path_to_cache="", tokenizer=TokenIds(eod_token_id), reset_position_ids=False,
            reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        )
        indices = kept_items(len(indexed), heldout_share, source=f"{self.prefix}.bin").astype(np.int32)
        self.dataset = _gpt_dataset_class()(indexed, self.prefix, indices, num_samples, Split.train, config,
                                            index_cache_dir=str(index_cache_dir), heldout_share=heldout_share)
        self.num_tokens = int(indexed.sequence_lengths.sum(dtype=np.int64))

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, index: int) -> np.ndarray:
        """The `seq_length + 1` tokens (int64) of sample `index` in GPTDataset's order."""
        text, _ = self.dataset._query_document_sample_shuffle_indices(index)
        return text

    def describe(self, index: int) -> str:
        """Where sample `index` starts, for error messages."""
        shuffled = int(self.dataset.shuffle_index[index])
        doc_position, offset = (int(v) for v in self.dataset.sample_index[shuffled])
        document = int(self.dataset.document_index[doc_position])
        pointer = int(self.dataset.dataset.index.sequence_pointers[document])
        itemsize = self.dataset.dataset.index.dtype_size
        return (f"{self.prefix}.bin, sample {index} (document {document}, token offset "
                f"{pointer // itemsize + offset})")
