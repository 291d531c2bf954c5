"""The demo-corpus BPE for models with a vocabulary smaller than OLMoE's (olmoe_small, ablations)."""

import json

import numpy as np
import pytest

from olmoe_megatron.config import ConfigError
from olmoe_megatron.data.config import DataConfig
from olmoe_megatron.data.corpus import DEMO_BPE_EOS, demo_bpe_tokenizer, demo_bpe_vocab_size, stdlib_source_files
from olmoe_megatron.data.errors import DataError
from olmoe_megatron.recipes import get_recipe, list_recipes

MAX_BYTES = 300_000


def test_spec_parsing_and_errors():
    assert demo_bpe_vocab_size("demo-bpe-4096") == 4096
    assert demo_bpe_vocab_size("olmoe") is None
    with pytest.raises(DataError, match=r"must be a number in \[512, 65536\], e.g. demo-bpe-4096"):
        demo_bpe_vocab_size("demo-bpe-12x")
    with pytest.raises(ConfigError, match=r"data.tokenizer: .*must be a number"):
        DataConfig(demo_corpus=True, tokenizer="demo-bpe-10")
    with pytest.raises(ConfigError, match=r"ends documents with id 0, but data.eos_token_id=50279; set data.eos_token_id=0"):
        DataConfig(demo_corpus=True, tokenizer="demo-bpe-4096")


def test_trained_once_deterministic_and_lossless(tmp_path):
    import tokenizers

    first = demo_bpe_tokenizer(1024, max_bytes=MAX_BYTES, cache_dir=tmp_path / "a")
    assert demo_bpe_tokenizer(1024, max_bytes=MAX_BYTES, cache_dir=tmp_path / "a") == first  # cached
    second = demo_bpe_tokenizer(1024, max_bytes=MAX_BYTES, cache_dir=tmp_path / "b")
    assert json.loads(first.read_text()) == json.loads(second.read_text())  # the same merges every time
    tokenizer = tokenizers.Tokenizer.from_file(str(first))
    assert tokenizer.get_vocab_size() <= 1024 and tokenizer.token_to_id(DEMO_BPE_EOS) == 0
    text = stdlib_source_files(MAX_BYTES)[0].read_text(encoding="utf-8")
    ids = tokenizer.encode(text).ids
    assert max(ids) < 1024 and 0 not in ids
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode()) / 2  # it compresses (a real BPE, not bytes)


def test_demo_bpe_corpus_fits_the_model(tmp_path):
    config = DataConfig(demo_corpus=True, tokenizer="demo-bpe-512", eos_token_id=0, demo_max_bytes=MAX_BYTES,
                        cache_dir=str(tmp_path))
    dataset = config.build(seq_length=64, num_samples=400, vocab_size=512)
    tokens = np.concatenate([np.asarray(dataset[i]["tokens"]) for i in range(400)])
    assert tokens.max() < 512 and (tokens == 0).any()  # documents end with id 0


@pytest.mark.parametrize("name", sorted(list_recipes()))
def test_every_recipe_tokenizer_fits_its_model(name):
    """A recipe whose data cannot feed its model would fail at the first step of `olmoe train`."""
    run = get_recipe(name)
    bpe = demo_bpe_vocab_size(run.data.tokenizer)
    if run.data.demo_corpus and not run.data.paths:
        vocab = bpe if bpe is not None else 50280  # OLMoE's tokenizer
        assert vocab <= run.model.vocab_size, (name, run.data.tokenizer, run.model.vocab_size)
    assert run.data.eos_token_id < run.model.vocab_size
