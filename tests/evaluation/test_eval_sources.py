"""Validation sources: fixed windows, the held-out share that training never draws, and bad input."""

import numpy as np
import pytest

from olmoe_megatron.config import ConfigError
from olmoe_megatron.data.config import DataConfig
from olmoe_megatron.data.heldout import heldout_items, kept_items
from olmoe_megatron.data.megatron_format import open_indexed_dataset
from olmoe_megatron.evaluation.config import EvalConfig, EvalSourceConfig
from olmoe_megatron.evaluation.sources import source_windows
from olmoe_megatron.testing.training_runs import write_synthetic_corpus

VOCAB = 50304


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_synthetic_corpus(tmp_path_factory.mktemp("sources") / "synthetic", num_documents=200)


def _data(corpus, tmp_path, **changes):
    return DataConfig(paths=(corpus,), demo_corpus=False, cache_dir=str(tmp_path / "index"), **changes)


def test_heldout_items_are_fixed_and_disjoint_from_the_kept_ones():
    held = heldout_items(1000, 0.05, source="x")
    assert len(held) == 50 and np.array_equal(held, heldout_items(1000, 0.05, source="y"))
    kept = kept_items(1000, 0.05, source="x")
    assert len(kept) == 950 and not set(held) & set(kept)
    assert np.array_equal(kept_items(10, 0.0, source="x"), np.arange(10))


@pytest.mark.parametrize("share, words", [(0.001, "holds out no item"), (0.999, "leaving that training source empty")])
def test_a_share_that_empties_either_side_is_refused(share, words):
    with pytest.raises(ConfigError, match=words) as info:
        heldout_items(100, share, source="data/web.bin")
    assert "data/web.bin" in str(info.value) and str(share) in str(info.value)


def test_file_windows_are_the_stream_in_order(corpus, tmp_path):
    source = EvalSourceConfig(name="val", paths=(corpus,))
    windows = source_windows(source, _data(corpus, tmp_path), max_tokens=100, seq_length=32, vocab_size=VOCAB,
                             micro_batch_size=2)
    stream = np.memmap(f"{corpus}.bin", dtype=np.uint16, mode="r")
    assert windows.num_windows == 4 and windows.num_tokens == 4 * 32  # ceil(100 / 32) windows
    for i in range(4):
        assert np.array_equal(windows.tokens[i], stream[i * 32:i * 32 + 32])
        assert np.array_equal(windows.labels[i], stream[i * 32 + 1:i * 32 + 33])


def test_megatron_order_never_draws_the_heldout_documents(corpus, tmp_path):
    data = _data(corpus, tmp_path)
    dataset = data.build(seq_length=32, num_samples=64, vocab_size=VOCAB, heldout_share=0.1)
    drawn = set(np.asarray(dataset._sources[0].dataset.document_index).tolist())
    held = set(heldout_items(200, 0.1, source="x").tolist())
    assert len(held) == 20 and drawn and not drawn & held
    plain = data.build(seq_length=32, num_samples=64, vocab_size=VOCAB)
    assert held <= set(np.asarray(plain._sources[0].dataset.document_index).tolist())

    windows = source_windows(EvalSourceConfig(name="heldout", share=0.1), data, max_tokens=256, seq_length=32,
                             vocab_size=VOCAB, micro_batch_size=2)
    index = open_indexed_dataset(corpus).index
    raw = np.memmap(f"{corpus}.bin", dtype=np.uint16, mode="r")
    documents = [raw[int(index.sequence_pointers[d]) // 2:][:int(index.sequence_lengths[d])] for d in sorted(held)]
    stream = np.concatenate(documents)  # the held-out documents back to back, in document order
    assert windows.num_windows == 8
    assert np.array_equal(windows.tokens.reshape(-1), stream[:8 * 32])


def test_olmo_order_never_draws_the_heldout_windows(corpus, tmp_path):
    data = _data(corpus, tmp_path, order="olmo")
    dataset = data.build(seq_length=32, num_samples=100, vocab_size=VOCAB, heldout_share=0.2)
    source = dataset._sources[0]
    num_windows = (source.num_tokens // 32)
    held = set(heldout_items(num_windows, 0.2, source="x").tolist())
    drawn = {source._locate(i)[1] // 32 for i in range(len(source))}
    assert drawn and not drawn & held and len(drawn) + len(held) == num_windows
    windows = source_windows(EvalSourceConfig(name="heldout", share=0.2), data, max_tokens=10 ** 6, seq_length=32,
                             vocab_size=VOCAB, micro_batch_size=2)
    assert windows.num_windows == len(held) and windows.loss_mask[:, -1].sum() == 0  # as training reads windows


def test_a_source_smaller_than_one_batch_is_refused(corpus, tmp_path):
    tiny = write_synthetic_corpus(tmp_path / "tiny", num_documents=1)
    with pytest.raises(ConfigError, match=r"eval.datasets\[tiny\].*fewer than one eval batch.*eval.micro_batch_size=8"):
        source_windows(EvalSourceConfig(name="tiny", paths=(tiny,)), _data(corpus, tmp_path), max_tokens=10 ** 6,
                       seq_length=128, vocab_size=VOCAB, micro_batch_size=8)


def test_tokens_beyond_the_vocabulary_are_refused(corpus, tmp_path):
    from olmoe_megatron.data.errors import DataError

    with pytest.raises(DataError, match="vocab_size 1000"):
        source_windows(EvalSourceConfig(name="val", paths=(corpus,)), _data(corpus, tmp_path), max_tokens=64,
                       seq_length=32, vocab_size=1000, micro_batch_size=1)


@pytest.mark.parametrize("changes, words", [
    (dict(interval=10), "eval.interval=10 is set but there is nothing to evaluate"),
    (dict(datasets=[{"name": "a", "paths": ["x"]}, {"name": "a", "share": 0.1}]), "names \\['a'\\] more than once"),
    (dict(datasets=[{"name": "a", "share": 0.1}, {"name": "b", "share": 0.2}]), "one held-out share"),
    (dict(datasets=[{"name": "a"}]), "gives none of paths, share and demo_heldout"),
    (dict(datasets=[{"name": "a", "paths": ["x"], "share": 0.1}]), "gives paths and share"),
    (dict(datasets=[{"name": "a", "share": 1.5}]), r"eval.datasets\[a\].share=1.5 must lie in \(0, 1\)"),
    (dict(datasets=[{"name": "a/b", "share": 0.1}]), "without '/'"),
    (dict(tasks=["hellaswag"]), "neither a .jsonl task file nor a built-in task"),
    (dict(tokens=0), "eval.tokens=0 must be >= 1"),
])
def test_eval_config_errors_name_the_field(changes, words):
    with pytest.raises(ConfigError, match=words):
        EvalConfig.from_dict(changes)


def test_eval_is_due_at_the_interval_and_the_end():
    config = EvalConfig.from_dict({"interval": 3, "datasets": [{"name": "a", "share": 0.1}]})
    assert [s for s in range(1, 11) if config.due(s, last_step=10)] == [3, 6, 9, 10]
    assert not EvalConfig().due(10, last_step=10)  # nothing to evaluate
    assert config.heldout_share == 0.1 and EvalConfig().heldout_share == 0.0


def test_olmo_npy_files_are_a_source(corpus, tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) % 700
    path = tmp_path / "part-0-00000.npy"
    tokens.tofile(path)  # OLMo's token files are headerless memmaps
    windows = source_windows(EvalSourceConfig(name="npy", paths=(str(path),), format="olmo_npy"),
                             _data(corpus, tmp_path), max_tokens=64, seq_length=16, vocab_size=VOCAB,
                             micro_batch_size=2)
    assert windows.num_windows == 4
    assert np.array_equal(windows.tokens[1], tokens[16:32]) and np.array_equal(windows.labels[1], tokens[17:33])
