"""TokenDataset: the map-style dataset the trainer reads, over Megatron's or OLMo's sample order.

`ds[i]` for a global sample index i returns numpy arrays `tokens` int64 [S], `labels` int64 [S]
and `loss_mask` float32 [S]. The dataset pickles as its plan only: a worker process or rank that
unpickles it maps the already-built caches again instead of copying arrays.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from olmoe_megatron.data.blend import MID_LEVEL_SURPLUS, blend_indices, normalize_weights, samples_per_source
from olmoe_megatron.data.errors import DataError
from olmoe_megatron.data.repetition import has_repeated_ngram
from olmoe_megatron.data.token_files import TokenFile

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DatasetPlan:
    """Everything a TokenDataset is a function of (plain values; pickles small)."""

    order: str
    groups: tuple[tuple[TokenFile, ...], ...]
    weights: tuple[float, ...] | None
    seq_length: int
    num_samples: int
    vocab_size: int
    seed: int
    eos_token_id: int
    index_cache_dir: str
    mask_repeated_ngrams: bool
    repetition_max_period: int
    repetition_min_repeats: int
    heldout_share: float = 0.0
    """Share of each source's documents (OLMo order: windows) held out for evaluation, never drawn."""


def split_sources(order: str, groups, weights) -> tuple[list[list[TokenFile]], list[float] | None]:
    """Splits weight groups into sample sources: Megatron order reads one prefix per source (a group's
    files share its weight by tokens); OLMo order concatenates a group's files, or all files when
    unweighted. Each source is also the unit a held-out share is taken from."""
    if order == "olmo":
        if weights is None:
            return [[f for group in groups for f in group]], None
        return [list(group) for group in groups], list(weights)
    group_weights = weights or [sum(f.num_tokens for f in group) for group in groups]
    sources, source_weights = [], []
    for group, weight in zip(groups, normalize_weights(group_weights)):
        group_tokens = sum(f.num_tokens for f in group)
        for token_file in group:
            sources.append([token_file])
            source_weights.append(weight * token_file.num_tokens / group_tokens)
    return sources, (source_weights if len(sources) > 1 else None)


class TokenDataset:
    """Map-style dataset of `plan.num_samples` samples in a fixed global order.

    Args:
        plan: What to read and how (built by `DataConfig.build`).
    """

    def __init__(self, plan: DatasetPlan) -> None:
        self.plan = plan
        self._open()

    def _open(self) -> None:
        plan = self.plan
        sources, weights = split_sources(plan.order, plan.groups, plan.weights)
        if weights is None:
            self._sources = [self._make_source(sources[0], plan.num_samples)]
            self._blend = None
        else:
            sizes = samples_per_source(weights, plan.num_samples, surplus=MID_LEVEL_SURPLUS)
            self._sources = [self._make_source(files, size) for files, size in zip(sources, sizes)]
            description = {"order": plan.order, "sources": [[f.raw_path for f in s] for s in sources],
                           "seq_length": plan.seq_length, "seed": plan.seed}
            dataset_index, sample_index, _ = blend_indices(
                weights, plan.num_samples, description=description, index_cache_dir=plan.index_cache_dir,
                source_lengths=[len(source) for source in self._sources])
            self._blend = (dataset_index, sample_index)

    def _make_source(self, files: list[TokenFile], num_samples: int):
        plan = self.plan
        if plan.order == "olmo":
            from olmoe_megatron.data.olmo_order import OlmoOrderSource

            return OlmoOrderSource([(f.raw_path, np.dtype(f.dtype)) for f in files], seq_length=plan.seq_length,
                                   num_samples=num_samples, seed=plan.seed, index_cache_dir=plan.index_cache_dir,
                                   heldout_share=plan.heldout_share)
        from olmoe_megatron.data.megatron_order import MegatronOrderSource

        return MegatronOrderSource(files[0].megatron_prefix, seq_length=plan.seq_length, num_samples=num_samples,
                                   seed=plan.seed, eod_token_id=plan.eos_token_id,
                                   index_cache_dir=plan.index_cache_dir, heldout_share=plan.heldout_share)

    def __len__(self) -> int:
        return self.plan.num_samples

    def __getstate__(self) -> dict:
        return {"plan": self.plan}

    def __setstate__(self, state: dict) -> None:
        self.plan = state["plan"]
        self._open()

    def _locate(self, index: int):
        if self._blend is None:
            return self._sources[0], index
        dataset_index, sample_index = self._blend
        return self._sources[int(dataset_index[index])], int(sample_index[index])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self.plan.num_samples:
            raise IndexError(f"sample {index} is outside this dataset of {self.plan.num_samples} samples")
        source, source_index = self._locate(index)
        text = source.sample(source_index)
        seq_length = self.plan.seq_length
        if self.plan.order == "olmo":
            tokens = text
            labels = np.empty_like(tokens)
            labels[:-1] = tokens[1:]
            labels[-1] = 0
            loss_mask = np.ones(seq_length, dtype=np.float32)
            loss_mask[-1] = 0.0  # the window's last token has no next token inside the window
        else:
            tokens, labels = text[:-1], text[1:]
            loss_mask = np.ones(seq_length, dtype=np.float32)
        if text.size and int(text.max()) >= self.plan.vocab_size:
            raise DataError(f"{source.describe(source_index)}: token id {int(text.max())} is >= vocab_size "
                            f"{self.plan.vocab_size}; the data was tokenized with a larger vocabulary "
                            f"(pass the right vocab_size or retokenize)")
        if self.plan.mask_repeated_ngrams and has_repeated_ngram(
                text, max_period=self.plan.repetition_max_period, min_repeats=self.plan.repetition_min_repeats):
            loss_mask[:] = 0.0
        return {"tokens": np.ascontiguousarray(tokens), "labels": np.ascontiguousarray(labels),
                "loss_mask": loss_mask}
