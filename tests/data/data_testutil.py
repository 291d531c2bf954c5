"""Fixtures of the data tests: a tiny word-level tokenizer and small token files."""

from __future__ import annotations

import json

import numpy as np
import pytest

WORDS = [f"w{i}" for i in range(60)]
EOS = "<|endoftext|>"


def make_tokenizer_json(path, words=WORDS) -> str:
    """A word-level tokenizer: ids 0..len(words)-1 for the words, then [UNK], then EOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {word: i for i, word in enumerate(words)}
    vocab["[UNK]"] = len(vocab)
    vocab[EOS] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> str:
    return make_tokenizer_json(tmp_path_factory.mktemp("tok") / "tokenizer.json")


TINY_EOS_ID = len(WORDS) + 1
TINY_VOCAB_SIZE = len(WORDS) + 2


def random_documents(num_documents: int, *, seed: int = 0, max_words: int = 40) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(WORDS[j] for j in rng.integers(0, len(WORDS), rng.integers(1, max_words)))
            for _ in range(num_documents)]


def expected_ids(documents: list[str]) -> list[list[int]]:
    """The ids our tokenizer gives each document, EOS appended: computed without the tokenizer."""
    return [[int(word[1:]) for word in doc.split()] + [TINY_EOS_ID] for doc in documents]


def write_jsonl(path, documents: list[str], field: str = "text") -> str:
    with open(path, "w", encoding="utf-8") as handle:
        for doc in documents:
            handle.write(json.dumps({field: doc, "meta": 1}) + "\n")
    return str(path)


def write_npy_tokens(path, documents: list[list[int]], dtype=np.uint16) -> str:
    np.concatenate([np.asarray(d) for d in documents]).astype(dtype).tofile(path)
    return str(path)


def random_token_documents(num_documents: int, *, seed: int, eos: int, vocab: int = 500,
                           max_len: int = 300) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(rng.integers(0, eos, rng.integers(1, max_len))) + [eos] for _ in range(num_documents)]
