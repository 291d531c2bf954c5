"""Held-out validation windows: the same fixed token windows of each named source, every time.

A source is read as one token stream (its files in order, documents back to back as they are
stored) cut into windows of `seq_length + 1` tokens with stride `seq_length`, so every token after
the first is predicted exactly once; the first ceil(eval.tokens / seq_length) windows are kept.
The held-out share of the training sources reads the documents that the training order never
draws (data/heldout.py), source by source, windows shared out in proportion to their tokens; in
OLMo's order the held-out items are whole training windows, evaluated as training reads them
(the window's last token has no label).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from olmoe_megatron.config import ConfigError
from olmoe_megatron.data.config import DataConfig
from olmoe_megatron.data.errors import DataError
from olmoe_megatron.data.heldout import heldout_items
from olmoe_megatron.data.token_files import TokenFile
from olmoe_megatron.evaluation.config import EvalConfig, EvalSourceConfig


@dataclasses.dataclass(frozen=True)
class EvalWindows:
    """One source's windows: `tokens`, `labels` int64 [W, S] and `loss_mask` float32 [W, S]."""

    name: str
    tokens: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    description: str

    @property
    def num_windows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_tokens(self) -> int:
        """Tokens whose loss is counted."""
        return int(self.loss_mask.sum(dtype=np.float64))


def build_sources(eval_config: EvalConfig, data: DataConfig, *, seq_length: int, vocab_size: int,
                  micro_batch_size: int) -> list[EvalWindows]:
    """The windows of every source in `eval_config.datasets`, in order (identical on every rank)."""
    return [source_windows(source, data, max_tokens=eval_config.tokens, seq_length=seq_length,
                           vocab_size=vocab_size, micro_batch_size=micro_batch_size)
            for source in eval_config.datasets]


def source_windows(source: EvalSourceConfig, data: DataConfig, *, max_tokens: int, seq_length: int,
                   vocab_size: int, micro_batch_size: int) -> EvalWindows:
    """The fixed windows of one source; raises ConfigError when it cannot fill one eval batch."""
    num_windows = math.ceil(max_tokens / seq_length)
    if source.share is not None:
        windows, description = _heldout_share_windows(source, data, num_windows=num_windows, seq_length=seq_length)
    else:
        files = _source_files(source, data)
        windows, description = _stream_windows(files, num_windows=num_windows, seq_length=seq_length)
    if windows[0].shape[0] < micro_batch_size:
        available = int(windows[2].sum(dtype=np.float64))
        raise ConfigError(
            f"eval.datasets[{source.name}] ({description}) has {available} tokens to evaluate, fewer than one "
            f"eval batch of eval.micro_batch_size={micro_batch_size} windows of {seq_length} tokens; give a "
            f"larger source, or lower eval.micro_batch_size or train.seq_length")
    tokens, labels, loss_mask = windows
    largest = int(max(tokens.max(), labels.max()))
    if largest >= vocab_size:
        raise DataError(f"eval.datasets[{source.name}] ({description}): token id {largest} is >= the model's "
                        f"vocab_size {vocab_size}; the source was tokenized with a larger vocabulary")
    return EvalWindows(source.name, tokens, labels, loss_mask, description)


def _source_files(source: EvalSourceConfig, data: DataConfig) -> list[TokenFile]:
    if source.demo_heldout:
        from olmoe_megatron.data.corpus import build_demo_heldout

        manifest = build_demo_heldout(data.resolved_cache_dir() / "demo_corpus", tokenizer_path=data.tokenizer,
                                      max_bytes=data.demo_max_bytes)
        paths, file_format = (str(manifest),), "megatron"
    else:
        paths, file_format = source.paths, source.format
    # OLMo order: the raw token files as they are (no Megatron index is built over a .npy file).
    as_data = DataConfig(paths=paths, format=file_format, tokenizer=data.tokenizer, eos_token_id=data.eos_token_id,
                         npy_dtype=data.npy_dtype, cache_dir=data.cache_dir, order="olmo")
    return [f for group in as_data.token_groups() for f in group]


def _raw_tokens(token_file: TokenFile) -> np.ndarray:
    return np.memmap(token_file.raw_path, dtype=np.dtype(token_file.dtype), mode="r")


def _stream_windows(files: list[TokenFile], *, num_windows: int, seq_length: int):
    """The first `num_windows` (fewer if short) stride-`seq_length` windows of the files' stream."""
    total = sum(f.num_tokens for f in files)
    num_windows = min(num_windows, max(0, (total - 1) // seq_length))
    stream = _take(files, num_windows * seq_length + 1 if num_windows else 0)
    description = ", ".join(f.raw_path for f in files)
    return _stride_windows(stream, num_windows, seq_length), description


def _take(files: list[TokenFile], count: int) -> np.ndarray:
    parts, need = [], count
    for token_file in files:
        if need <= 0:
            break
        part = np.asarray(_raw_tokens(token_file)[:need], dtype=np.int64)
        parts.append(part)
        need -= part.shape[0]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _stride_windows(stream: np.ndarray, num_windows: int, seq_length: int):
    if num_windows == 0:
        empty = np.zeros((0, seq_length), dtype=np.int64)
        return empty, empty.copy(), np.zeros((0, seq_length), dtype=np.float32)
    starts = np.arange(num_windows, dtype=np.int64)[:, None] * seq_length
    index = starts + np.arange(seq_length + 1, dtype=np.int64)[None, :]
    windows = stream[index]
    return (np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:]),
            np.ones((num_windows, seq_length), dtype=np.float32))


def _heldout_share_windows(source: EvalSourceConfig, data: DataConfig, *, num_windows: int, seq_length: int):
    from olmoe_megatron.data.token_dataset import split_sources

    groups = data.token_groups()
    train_sources, _ = split_sources(data.order, groups, data.weights)
    description = f"held-out share {source.share} of {sum(len(s) for s in train_sources)} training file(s)"
    if data.order == "olmo":
        return _heldout_olmo_windows(train_sources, share=source.share, num_windows=num_windows,
                                     seq_length=seq_length), description
    documents = [_HeldoutDocuments(files[0], share=source.share) for files in train_sources]
    counts = _share_out(num_windows, [max(0, (d.num_tokens - 1) // seq_length) for d in documents])
    parts = [_stride_windows(d.first_tokens(count * seq_length + 1), count, seq_length)
             for d, count in zip(documents, counts)]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3)), description


class _HeldoutDocuments:
    """The held-out documents of one Megatron-order source, read back to back only as far as needed."""

    def __init__(self, token_file: TokenFile, *, share: float) -> None:
        from olmoe_megatron.data.megatron_format import open_indexed_dataset

        index = open_indexed_dataset(token_file.megatron_prefix).index
        documents = heldout_items(len(index), share, source=f"{token_file.megatron_prefix}.bin")
        self._raw = _raw_tokens(token_file)
        self._starts = np.asarray(index.sequence_pointers[documents], dtype=np.int64) // index.dtype_size
        self._lengths = np.asarray(index.sequence_lengths[documents], dtype=np.int64)
        self.num_tokens = int(self._lengths.sum())

    def first_tokens(self, count: int) -> np.ndarray:
        if count <= 1:
            return np.zeros(0, dtype=np.int64)
        last = int(np.searchsorted(np.cumsum(self._lengths), count))  # documents [0, last] hold `count` tokens
        parts = [np.asarray(self._raw[s:s + n], dtype=np.int64)
                 for s, n in zip(self._starts[:last + 1], self._lengths[:last + 1])]
        return np.concatenate(parts)[:count]


def _heldout_olmo_windows(train_sources: list[list[TokenFile]], *, share: float, num_windows: int, seq_length: int):
    """Held-out training windows of OLMo's order (each source's windows over its concatenated files)."""
    per_source = []
    for files in train_sources:
        raws = [_raw_tokens(f) for f in files]
        first = np.concatenate(([0], np.cumsum([r.shape[0] // seq_length for r in raws])))
        chosen = heldout_items(int(first[-1]), share, source=", ".join(f.raw_path for f in files),
                               unit=f"windows of {seq_length} tokens")
        per_source.append((raws, first, chosen))
    counts = _share_out(num_windows, [len(chosen) for _, _, chosen in per_source])
    rows = []
    for (raws, first, chosen), count in zip(per_source, counts):
        for instance in chosen[:count]:
            file_index = int(np.searchsorted(first, instance, side="right")) - 1
            start = (int(instance) - int(first[file_index])) * seq_length
            rows.append(np.asarray(raws[file_index][start:start + seq_length], dtype=np.int64))
    tokens = np.stack(rows) if rows else np.zeros((0, seq_length), dtype=np.int64)
    labels = np.zeros_like(tokens)
    labels[:, :-1] = tokens[:, 1:]
    loss_mask = np.ones(tokens.shape, dtype=np.float32)
    loss_mask[:, -1] = 0.0
    return tokens, labels, loss_mask


def _share_out(total: int, capacities: list[int]) -> list[int]:
    """`total` windows shared out in proportion to `capacities` (largest remainders), none above its capacity."""
    available = sum(capacities)
    if available <= total:
        return list(capacities)
    exact = [total * c / available for c in capacities]
    counts = [min(c, int(e)) for c, e in zip(capacities, exact)]
    order = sorted(range(len(capacities)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    for i in order:
        if sum(counts) >= total:
            break
        if counts[i] < capacities[i]:
            counts[i] += 1
    return counts
