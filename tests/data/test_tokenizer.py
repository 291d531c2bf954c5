"""OLMoE's tokenizer fetch and tokenizer resolution."""

import pytest

from olmoe_megatron.data.errors import DataError
from olmoe_megatron.data.tokenizer import (
    OLMOE_EOS_TOKEN_ID,
    OLMOE_PAD_TOKEN_ID,
    OLMOE_TOKENIZER_BYTES,
    OLMOE_VOCAB_SIZE,
    find_eos_token_id,
    load_tokenizer,
    olmoe_tokenizer_path,
    resolve_tokenizer_path,
)


def test_real_olmoe_tokenizer_ids():
    try:
        path = olmoe_tokenizer_path()
    except DataError as exc:
        pytest.skip(f"OLMoE tokenizer neither cached nor downloadable from PyPI here: {exc}")
    assert path.stat().st_size == OLMOE_TOKENIZER_BYTES
    tokenizer = load_tokenizer(str(path))
    assert tokenizer.get_vocab_size() == OLMOE_VOCAB_SIZE
    assert find_eos_token_id(tokenizer) == OLMOE_EOS_TOKEN_ID
    assert tokenizer.id_to_token(OLMOE_PAD_TOKEN_ID) == "<|padding|>"
    assert tokenizer.id_to_token(0) == "|||IP_ADDRESS|||"
    assert tokenizer.encode("Hello world", add_special_tokens=False).ids == [12092, 1533]


def test_missing_tokenizer_file_is_named(tmp_path):
    with pytest.raises(DataError, match="nothere.json"):
        resolve_tokenizer_path(str(tmp_path / "nothere.json"))


def test_not_cached_without_download_says_how_to_fetch(tmp_path):
    with pytest.raises(DataError, match="olmoe prep tokenizer"):
        olmoe_tokenizer_path(cache_dir=tmp_path, download=False)


def test_tokenizer_without_eos_asks_for_the_id(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "t.json"
    Tokenizer(models.WordLevel(vocab={"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(path))
    with pytest.raises(DataError, match="--eos-id"):
        find_eos_token_id(load_tokenizer(str(path)), path=path)
