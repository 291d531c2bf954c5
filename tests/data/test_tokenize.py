"""`tokenize`: every input kind, exact token arrays, sharding, manifest, resume and atomicity."""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
from data_testutil import TINY_EOS_ID, expected_ids, random_documents, write_jsonl

from olmoe_megatron.data.megatron_format import check_prefix, idx_path
from olmoe_megatron.data.tokenize_text import TokenizeConfig, manifest_path, shard_prefixes, tokenize


def read_documents(manifest_file) -> list[list[int]]:
    """All documents of all shards in order, read through Megatron-Core's IndexedDataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    documents = []
    for prefix in shard_prefixes(manifest_file):
        dataset = IndexedDataset(prefix)
        documents.extend(dataset[i].tolist() for i in range(len(dataset)))
    return documents


def _write_input(kind, path, documents):
    if kind == "jsonl":
        return write_jsonl(path.with_suffix(".jsonl"), documents)
    lines = "".join(json.dumps({"text": d}) + "\n" for d in documents).encode()
    if kind == "jsonl.gz":
        target = path.with_suffix(".jsonl.gz")
        target.write_bytes(gzip.compress(lines))
    elif kind == "jsonl.zst":
        import zstandard

        target = path.with_suffix(".jsonl.zst")
        target.write_bytes(zstandard.ZstdCompressor().compress(lines))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        target = path.with_suffix(".parquet")
        pq.write_table(pa.table({"text": documents, "id": list(range(len(documents)))}), target, row_group_size=7)
    return str(target)


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet"])
def test_each_input_kind_gives_exact_tokens(tmp_path, tiny_tokenizer, kind):
    documents = random_documents(30, seed=1)
    source = _write_input(kind, tmp_path / "input", documents)
    manifest = tokenize(TokenizeConfig(inputs=(source,), output_prefix=str(tmp_path / "out" / "c"),
                                       tokenizer=tiny_tokenizer, num_workers=1))
    assert read_documents(manifest_path(str(tmp_path / "out" / "c"))) == expected_ids(documents)
    assert manifest["documents"] == 30
    assert manifest["tokens"] == sum(len(d) for d in expected_ids(documents))
    assert manifest["eos_token_id"] == TINY_EOS_ID and manifest["dtype"] == "uint16"
    assert check_prefix(str(tmp_path / "out" / "c_00000")).dtype == np.uint16


def test_shards_by_size_in_parallel_keep_document_order(tmp_path, tiny_tokenizer):
    documents = random_documents(400, seed=2)
    first = write_jsonl(tmp_path / "a.jsonl", documents[:250])
    second = write_jsonl(tmp_path / "b.jsonl", documents[250:])
    prefix = str(tmp_path / "out" / "c")
    manifest = tokenize(TokenizeConfig(inputs=(str(tmp_path / "*.jsonl"),), output_prefix=prefix,
                                       tokenizer=tiny_tokenizer, shard_bytes=8_000, num_workers=2))
    assert len(manifest["shards"]) > 3
    assert read_documents(manifest_path(prefix)) == expected_ids(documents)
    assert manifest["source_files"] == [os.path.abspath(first), os.path.abspath(second)]
    from olmoe_megatron.data.fileutil import sha256_file

    for shard, shard_prefix in zip(manifest["shards"], shard_prefixes(manifest_path(prefix))):
        assert shard["bin_sha256"] == sha256_file(f"{shard_prefix}.bin")
        assert shard["idx_sha256"] == sha256_file(f"{shard_prefix}.idx")
    assert not [p for p in os.listdir(tmp_path / "out") if p.endswith(".tmp")]


def test_rerun_skips_finished_shards_and_redoes_unfinished(tmp_path, tiny_tokenizer):
    source = write_jsonl(tmp_path / "a.jsonl", random_documents(200, seed=3))
    prefix = str(tmp_path / "out" / "c")
    config = TokenizeConfig(inputs=(source,), output_prefix=prefix, tokenizer=tiny_tokenizer,
                            shard_bytes=5_000, num_workers=1)
    tokenize(config)
    shards = shard_prefixes(manifest_path(prefix))
    before = {p: os.stat(f"{p}.bin").st_mtime_ns for p in shards}
    # An interrupted shard: its record was never written (the record is written last).
    os.unlink(f"{shards[1]}.json")
    os.unlink(idx_path(shards[1]))
    tokenize(config)
    after = {p: os.stat(f"{p}.bin").st_mtime_ns for p in shards}
    assert [p for p in shards if before[p] != after[p]] == [shards[1]]
    assert read_documents(manifest_path(prefix)) == expected_ids(random_documents(200, seed=3))


def test_our_idx_equals_megatron_builder_bytes(tmp_path, tiny_tokenizer):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    documents = random_documents(25, seed=4)
    source = write_jsonl(tmp_path / "a.jsonl", documents)
    tokenize(TokenizeConfig(inputs=(source,), output_prefix=str(tmp_path / "ours"), tokenizer=tiny_tokenizer,
                            num_workers=1))
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for ids in expected_ids(documents):
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(str(tmp_path / "ref.idx"))
    assert (tmp_path / "ours_00000.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes()
    assert (tmp_path / "ours_00000.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()


def test_int32_dtype_and_text_field(tmp_path, tiny_tokenizer):
    documents = random_documents(10, seed=5)
    source = write_jsonl(tmp_path / "a.jsonl", documents, field="content")
    prefix = str(tmp_path / "c")
    tokenize(TokenizeConfig(inputs=(source,), output_prefix=prefix, tokenizer=tiny_tokenizer, text_field="content",
                            dtype="int32", num_workers=1))
    assert check_prefix(f"{prefix}_00000").dtype == np.int32
    assert read_documents(manifest_path(prefix)) == expected_ids(documents)


def test_dtype_rule_follows_megatron():
    from olmoe_megatron.data.megatron_format import token_dtype_for_vocab

    assert token_dtype_for_vocab(50280) == np.uint16
    assert token_dtype_for_vocab(65499) == np.uint16
    assert token_dtype_for_vocab(65500) == np.int32


@pytest.mark.parametrize("content", ["", '{"text": ""}\n{"text": ""}\n'])
def test_input_without_text_is_an_error_and_leaves_nothing(tmp_path, tiny_tokenizer, content):
    from olmoe_megatron.data.errors import DataError

    source = tmp_path / "empty.jsonl"
    source.write_text(content)
    prefix = str(tmp_path / "out" / "c")
    with pytest.raises(DataError, match=r"tokenize: 1 input file\(s\) \(.*empty.jsonl\) hold no text in field 'text'"):
        tokenize(TokenizeConfig(inputs=(str(source),), output_prefix=prefix, tokenizer=tiny_tokenizer, num_workers=1))
    assert not os.path.exists(manifest_path(prefix))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_data_path_with_no_tokens_is_refused_before_training(tmp_path):
    """A 0-token Megatron file (e.g. tokenized from empty input by another tool) is refused with
    its path when the dataset is built; training on it died of ZeroDivisionError."""
    from olmoe_megatron.data.config import DataConfig
    from olmoe_megatron.data.errors import DataError
    from olmoe_megatron.data.megatron_format import ShardWriter

    prefix = str(tmp_path / "zero")
    ShardWriter(prefix, np.uint16).finish()
    with pytest.raises(DataError, match=r"data.paths entry '.*zero' holds 0 tokens"):
        DataConfig(paths=(prefix,), demo_corpus=False).token_groups(cache_dir=tmp_path / "cache")


def test_fast_and_hf_encoders_write_identical_shards(tmp_path, monkeypatch, caplog):
    """`olmoe prep tokenize` output is the same bytes with the fast path as with HF tokenizers forced
    (by the config field and by the environment variable), over several shards and two workers."""
    import logging

    from olmoe_megatron.data.corpus import stdlib_source_files
    from olmoe_megatron.data.errors import DataError
    from olmoe_megatron.data.fast_tokenizer import ENCODER_ENV
    from olmoe_megatron.data.tokenizer import olmoe_tokenizer_path

    try:
        tokenizer = str(olmoe_tokenizer_path())
    except DataError as exc:
        pytest.skip(f"OLMoE tokenizer neither cached nor downloadable from PyPI here: {exc}")
    documents = [p.read_text(encoding="utf-8") for p in stdlib_source_files(200_000)]
    documents += ["caf\u00e9 na\u0131ve\r\n\tA\u030a \u212b \u1100\u1161\u11a8", "mail |||EMAIL_ADDRESS||| now",
                  "<|endoftext|> inside", "a\u0898\u0316 (HF's NFC differs)", "\U0001f469\u200d\U0001f467 ok",
                  "x" + " " * 50 + "y\n\n\n", "\u4e2d\u6587 \u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u0939\u093f"]
    source = write_jsonl(tmp_path / "in.jsonl", documents)

    def run(name: str, **kwargs) -> dict:
        prefix = str(tmp_path / name / "c")
        manifest = tokenize(TokenizeConfig(inputs=(source,), output_prefix=prefix, tokenizer=tokenizer,
                                           shard_bytes=60_000, num_workers=2, **kwargs))
        return {f"{Path(p).name}{suffix}": Path(f"{p}{suffix}").read_bytes()
                for p in shard_prefixes(manifest_path(prefix)) for suffix in (".bin", ".idx")} | {"m": manifest}

    with caplog.at_level(logging.INFO, logger="olmoe_megatron.data.tokenize_text"):
        fast = run("fast")
    assert "fast encoder" in caplog.text
    forced = run("hf", encoder="hf")
    monkeypatch.setenv(ENCODER_ENV, "hf")
    by_env = run("env")
    assert len(fast) > 5 and fast.keys() == forced.keys() == by_env.keys()
    for name in fast:
        if name != "m":
            assert fast[name] == forced[name] == by_env[name], name
    assert fast["m"]["tokens"] == forced["m"]["tokens"] and fast["m"]["documents"] == len(documents)
