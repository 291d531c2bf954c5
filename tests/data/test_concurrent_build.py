"""All ranks build the same data at once into an empty cache (the trainer has no rank-0-first build
and no barrier): every corpus, tokenizer and index cache is built once, under its file lock, and
every rank reads the same samples."""

import collections

import pytest

from data_testutil import random_token_documents, write_npy_tokens
from olmoe_megatron.testing.data_build_check import concurrent_build, list_files
from olmoe_megatron.testing.distributed import get_pool
from olmoe_megatron.testing.training_runs import write_synthetic_corpus

NPY_EOS, NPY_VOCAB = 499, 500


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    source = tmp_path_factory.mktemp("source")
    npy = [write_npy_tokens(source / f"part{i}.npy", random_token_documents(60, seed=i, eos=NPY_EOS, vocab=NPY_VOCAB))
           for i in range(2)]
    prefix = write_synthetic_corpus(source / "synthetic")
    cache, tokenizers = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("olmoe_cache")
    configs = {
        # Megatron order over OLMo .npy files: a cached .idx per file, a GPTDataset index per file, a blend.
        "megatron_blend": {"paths": npy, "weights": [0.3, 0.7], "format": "olmo_npy", "order": "megatron",
                           "eos_token_id": NPY_EOS, "cache_dir": str(cache)},
        "olmo": {"paths": [prefix], "order": "olmo", "cache_dir": str(cache)},
        # The demo corpus: a BPE trained on it, the tokenized corpus, a GPTDataset index.
        "demo": {"demo_corpus": True, "demo_max_bytes": 100_000, "tokenizer": "demo-bpe-512", "eos_token_id": 0,
                 "cache_dir": str(cache)},
    }
    vocab_sizes = {"megatron_blend": NPY_VOCAB, "olmo": 50280, "demo": 512}
    results = get_pool(2).run(concurrent_build, configs, seq_length=32, num_samples=64, vocab_sizes=vocab_sizes,
                              tokenizer_cache=str(tokenizers))
    return results, list_files(str(cache)), list_files(str(tokenizers))


def test_every_rank_reads_the_same_samples(built):
    results, _, _ = built
    assert results[0]["digests"] == results[1]["digests"]
    assert set(results[0]["digests"]) == {"megatron_blend", "olmo", "demo"}


def test_each_cache_is_built_once(built):
    results, _, _ = built
    builds = collections.Counter(message.split(" in ")[0] for r in results for message in r["builds"])
    assert all(count == 1 for count in builds.values()), builds
    kinds = collections.Counter(message.split()[1] for message in builds)
    # GPTDataset: two .npy sources and the demo corpus; "demo" corpus, "a" 512-entry BPE.
    assert kinds == {"GPTDataset": 3, "blend": 1, "olmo-order": 1, "demo": 1, "a": 1}, builds


def test_the_cache_holds_one_set_of_files_and_no_temporaries(built):
    _, cache_files, tokenizer_files = built
    assert not [f for f in cache_files + tokenizer_files if f.endswith(".tmp") or "/." in f or f.startswith(".")]
    markers = collections.Counter(f.split("-")[0] for f in cache_files if f.endswith("-description.json"))
    assert markers == {"GPTDataset": 3, "blend": 1, "olmo": 1}
    top_level = [f for f in cache_files if "/" not in f]
    assert len([f for f in top_level if f.endswith(".npy")]) == 3 * 3 + 2 + 1
    assert len([f for f in top_level if f.startswith("npy-") and f.endswith(".idx")]) == 2
    assert len([f for f in cache_files if f.endswith(".manifest.json")]) == 1
    assert len([f for f in tokenizer_files if f.endswith(".json")]) == 1
