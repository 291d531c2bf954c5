"""Sample orders against independent computations: Megatron's own builder, and OLMo's rule by hand."""

import multiprocessing
import pickle

import numpy as np
import pytest
from data_testutil import random_token_documents, write_npy_tokens

from olmoe_megatron.data.config import DataConfig
from olmoe_megatron.data.format_conversion import olmo_to_megatron

EOS = 999
VOCAB = 1000


def _megatron_prefix(tmp_path, name, seed, num_documents=60):
    npy = write_npy_tokens(tmp_path / f"{name}.npy", random_token_documents(num_documents, seed=seed, eos=EOS))
    olmo_to_megatron(npy, str(tmp_path / name), eos_token_id=EOS)
    return str(tmp_path / name)


def _megatron_reference(blend, *, seq_length, num_samples, seed, cache):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from olmoe_megatron.data.megatron_order import TokenIds

    config = GPTDatasetConfig(random_seed=seed, sequence_length=seq_length, blend=blend, split="1,0,0",
                              path_to_cache=cache, tokenizer=TokenIds(EOS), reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config).build()
    return train


def test_megatron_order_equals_megatron_gpt_dataset(tmp_path):
    prefix = _megatron_prefix(tmp_path, "a", seed=0)
    ours = DataConfig(paths=(prefix,), seed=5, eos_token_id=EOS, cache_dir=str(tmp_path / "cache"),
                      mask_repeated_ngrams=False).build(seq_length=32, num_samples=300, vocab_size=VOCAB)
    reference = _megatron_reference(([prefix], None), seq_length=32, num_samples=300, seed=5,
                                    cache=str(tmp_path / "ref_cache"))
    for index in range(300):
        sample, expected = ours[index], reference[index]
        np.testing.assert_array_equal(sample["tokens"], expected["tokens"].numpy())
        np.testing.assert_array_equal(sample["labels"], expected["labels"].numpy())
        assert sample["loss_mask"].tolist() == [1.0] * 32


def test_weighted_blend_equals_megatron_blended_dataset(tmp_path):
    first, second = _megatron_prefix(tmp_path, "a", seed=1), _megatron_prefix(tmp_path, "b", seed=2, num_documents=90)
    ours = DataConfig(paths=(first, second), weights=(0.3, 0.7), seed=7, eos_token_id=EOS,
                      cache_dir=str(tmp_path / "cache"), mask_repeated_ngrams=False
                      ).build(seq_length=16, num_samples=500, vocab_size=VOCAB)
    reference = _megatron_reference(([first, second], [0.3, 0.7]), seq_length=16, num_samples=500, seed=7, cache=None)
    assert len(ours) == 500
    for index in range(500):
        np.testing.assert_array_equal(ours[index]["tokens"], reference[index]["tokens"].numpy())


def test_olmo_order_equals_olmo_rule_by_hand(tmp_path):
    seq_length, seed = 24, 11
    files = [write_npy_tokens(tmp_path / f"part-{i}.npy", random_token_documents(20 + 7 * i, seed=i, eos=EOS))
             for i in range(3)]
    arrays = [np.fromfile(f, dtype=np.uint16) for f in files]
    windows = [array[k * seq_length:(k + 1) * seq_length] for array in arrays for k in range(len(array) // seq_length)]
    num_instances = len(windows)
    num_samples = num_instances + 10  # reaches into a second epoch
    dataset = DataConfig(paths=tuple(files), format="olmo_npy", order="olmo", seed=seed, eos_token_id=EOS,
                         cache_dir=str(tmp_path / "cache"), mask_repeated_ngrams=False
                         ).build(seq_length=seq_length, num_samples=num_samples, vocab_size=VOCAB)
    for index in range(num_samples):
        epoch, position = divmod(index, num_instances)
        order = np.random.Generator(np.random.PCG64(seed + epoch)).permutation(np.arange(num_instances, dtype=np.uint32))
        window = windows[order[position]].astype(np.int64)
        sample = dataset[index]
        np.testing.assert_array_equal(sample["tokens"], window)
        np.testing.assert_array_equal(sample["labels"][:-1], window[1:])
        assert sample["loss_mask"].tolist() == [1.0] * (seq_length - 1) + [0.0]


def test_olmo_npy_in_megatron_order_equals_megatron_files(tmp_path):
    prefix = _megatron_prefix(tmp_path, "a", seed=3)
    common = dict(seed=1, eos_token_id=EOS, cache_dir=str(tmp_path / "cache"))
    from_npy = DataConfig(paths=(f"{prefix}.npy",), format="olmo_npy", **common).build(
        seq_length=20, num_samples=100, vocab_size=VOCAB)
    from_megatron = DataConfig(paths=(prefix,), **common).build(seq_length=20, num_samples=100, vocab_size=VOCAB)
    for index in range(100):
        np.testing.assert_array_equal(from_npy[index]["tokens"], from_megatron[index]["tokens"])


def test_dataset_pickles_small_and_reads_the_same(tmp_path):
    prefix = _megatron_prefix(tmp_path, "a", seed=4)
    dataset = DataConfig(paths=(prefix,), eos_token_id=EOS, cache_dir=str(tmp_path / "cache")).build(
        seq_length=16, num_samples=50, vocab_size=VOCAB)
    payload = pickle.dumps(dataset)
    assert len(payload) < 4096
    copy = pickle.loads(payload)
    for index in (0, 17, 49):
        np.testing.assert_array_equal(copy[index]["tokens"], dataset[index]["tokens"])
    with pytest.raises(IndexError):
        dataset[50]


def _build_in_child(cache_dir, log_path, result_queue):
    from olmoe_megatron.data.index_cache import cached_arrays

    def build():
        with open(log_path, "a") as log:
            log.write("built\n")
        return {"values": np.arange(1000) * 3}

    arrays = cached_arrays(cache_dir, kind="test", description={"x": 1}, names=("values",), build=build)
    result_queue.put(int(arrays["values"].sum()))


def test_cache_is_built_once_while_other_processes_wait(tmp_path):
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    children = [context.Process(target=_build_in_child, args=(str(tmp_path / "c"), str(tmp_path / "log"), results))
                for _ in range(4)]
    for child in children:
        child.start()
    sums = [results.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
    assert sums == [int((np.arange(1000) * 3).sum())] * 4
    assert (tmp_path / "log").read_text() == "built\n"
    assert not list((tmp_path / "c").glob("*.tmp"))


def test_repeated_ngram_instances_lose_their_labels(tmp_path):
    rng = np.random.default_rng(0)
    repeated = np.array([4] * 33 + [1, 2, 3, 5, 6, 7, 9])  # one token 33 times in a row
    varied = rng.integers(0, 500, 40)
    np.concatenate([repeated, varied, [EOS]]).astype(np.uint16).tofile(tmp_path / "r.npy")
    dataset = DataConfig(paths=(str(tmp_path / "r.npy"),), format="olmo_npy", order="olmo", eos_token_id=EOS,
                         cache_dir=str(tmp_path / "cache")).build(seq_length=40, num_samples=2, vocab_size=VOCAB)
    masks = {int(dataset[i]["tokens"][0]): dataset[i]["loss_mask"].sum() for i in range(2)}
    assert masks == {4: 0.0, int(varied[0]): 39.0}
