"""The repeated-n-gram label mask against a brute-force count, and MicroBatchIterator's global order."""

import numpy as np
import pytest
import torch

from olmoe_megatron.config import ConfigError
from olmoe_megatron.data.loader import MicroBatchIterator
from olmoe_megatron.data.repetition import has_repeated_ngram


def brute_force_max_repeats(tokens, max_period):
    """Largest k such that some pattern of 1..max_period tokens occurs k times back to back."""
    best = 0
    n = len(tokens)
    for period in range(1, max_period + 1):
        for start in range(n - period + 1):
            pattern = list(tokens[start:start + period])
            count = 1
            while list(tokens[start + count * period:start + (count + 1) * period]) == pattern:
                count += 1
            best = max(best, count)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_repetition_filter_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    period = int(rng.integers(1, 14))
    repeats = int(rng.integers(28, 36))
    pattern = list(rng.integers(0, 50, period))
    body = pattern * repeats + pattern[: int(rng.integers(0, period))]
    tokens = np.array(list(rng.integers(0, 50, 30)) + body + list(rng.integers(0, 50, 30)))
    expected = brute_force_max_repeats(tokens, 13) >= 32
    assert has_repeated_ngram(tokens, max_period=13, min_repeats=32) == expected


def test_repetition_filter_thresholds():
    assert has_repeated_ngram(np.array([5] * 32))
    assert not has_repeated_ngram(np.array([5] * 31))
    assert has_repeated_ngram(np.array([1, 2, 3] * 32))
    assert not has_repeated_ngram(np.array([1, 2, 3] * 31 + [1, 2]))
    assert not has_repeated_ngram(np.array(list(range(14)) * 40))  # period 14 is longer than 13


class _IndexDataset:
    """Sample i is the row [i, i, ...]: lets a test see which global sample landed where."""

    def __init__(self, size, seq_length=4):
        self.size, self.seq_length = size, seq_length

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        row = np.full(self.seq_length, index, dtype=np.int64)
        return {"tokens": row, "labels": row + 1, "loss_mask": np.ones(self.seq_length, np.float32)}


def _global_order(dataset, dp_size, micro_batch_size, global_batch_size=8, consumed=0):
    """Samples of each global batch in DP-rank order, from dp_size iterators."""
    iterators = [iter(MicroBatchIterator(dataset, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                                         dp_rank=rank, dp_size=dp_size, consumed_samples=consumed))
                 for rank in range(dp_size)]
    order = []
    for per_rank in zip(*iterators):
        for micro_batches in per_rank:
            for batch in micro_batches:
                order.extend(batch["tokens"][:, 0].tolist())
    return order


def test_global_order_is_independent_of_dp_size():
    dataset = _IndexDataset(40)
    expected = list(range(40))
    assert _global_order(dataset, 1, 8) == expected
    assert _global_order(dataset, 2, 2) == expected
    assert _global_order(dataset, 4, 1) == expected
    assert _global_order(dataset, 8, 1) == expected


def test_resume_from_consumed_samples_does_not_replay():
    dataset = _IndexDataset(40)
    loader = MicroBatchIterator(dataset, global_batch_size=8, micro_batch_size=2, dp_rank=0, dp_size=2)
    stream = iter(loader)
    next(stream), next(stream)
    state = loader.state_dict()
    assert state == {"consumed_samples": 16}
    assert _global_order(dataset, 2, 2, consumed=state["consumed_samples"]) == list(range(16, 40))


def test_micro_batch_contents_and_shapes():
    loader = MicroBatchIterator(_IndexDataset(16, seq_length=5), global_batch_size=8, micro_batch_size=2,
                                dp_rank=1, dp_size=2)
    assert loader.num_microbatches == 2 and loader.num_global_batches == 2
    micro_batches = next(iter(loader))
    assert [b["tokens"][:, 0].tolist() for b in micro_batches] == [[4, 5], [6, 7]]
    batch = micro_batches[0]
    assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape == (2, 5)
    assert batch["loss_mask"].dtype == torch.float32
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4]] * 2


def test_indivisible_batch_sizes_name_fields_and_fixes():
    with pytest.raises(ConfigError, match=r"global_batch_size=10 must be divisible by micro_batch_size=2 \* dp_size=4 "
                                          r"= 8; try global_batch_size=8 or 16"):
        MicroBatchIterator(_IndexDataset(40), global_batch_size=10, micro_batch_size=2, dp_rank=0, dp_size=4)
    with pytest.raises(ConfigError, match=r"dp_rank=2 must be in \[0, dp_size=2\)"):
        MicroBatchIterator(_IndexDataset(40), global_batch_size=8, micro_batch_size=2, dp_rank=2, dp_size=2)
