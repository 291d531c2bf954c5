"""Bad input: every case raises DataError naming the file and the offset or line."""

import json
import struct

import numpy as np
import pytest
from data_testutil import TINY_EOS_ID, random_documents, write_jsonl

from olmoe_megatron.data.errors import DataError
from olmoe_megatron.data.megatron_format import check_prefix, index_bytes
from olmoe_megatron.data.olmo_npy import document_lengths, open_token_file
from olmoe_megatron.data.tokenize_text import TokenizeConfig, tokenize


@pytest.fixture
def good_prefix(tmp_path):
    lengths = np.array([3, 5, 2], dtype=np.int32)
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "d.bin")
    (tmp_path / "d.idx").write_bytes(index_bytes(lengths, np.uint16))
    assert check_prefix(str(tmp_path / "d")).num_tokens == 10
    return tmp_path / "d"


def _patch_idx(prefix, offset, payload):
    raw = bytearray(prefix.with_suffix(".idx").read_bytes())
    raw[offset:offset + len(payload)] = payload
    prefix.with_suffix(".idx").write_bytes(bytes(raw))


def test_wrong_magic(good_prefix):
    _patch_idx(good_prefix, 0, b"NOTMAGIC!")
    with pytest.raises(DataError, match=r"d\.idx: wrong magic .* byte offset 0"):
        check_prefix(str(good_prefix))


def test_wrong_version(good_prefix):
    _patch_idx(good_prefix, 9, struct.pack("<Q", 2))
    with pytest.raises(DataError, match=r"d\.idx: version 2 at byte offset 9"):
        check_prefix(str(good_prefix))


def test_bad_dtype_code(good_prefix):
    _patch_idx(good_prefix, 17, struct.pack("<B", 7))  # float32 is no token dtype
    with pytest.raises(DataError, match=r"d\.idx: dtype code 7 at byte offset 17"):
        check_prefix(str(good_prefix))


def test_truncated_idx(good_prefix):
    idx = good_prefix.with_suffix(".idx")
    idx.write_bytes(idx.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"d\.idx: .* truncated or corrupt"):
        check_prefix(str(good_prefix))
    idx.write_bytes(idx.read_bytes()[:20])
    with pytest.raises(DataError, match=r"d\.idx: truncated at byte 20"):
        check_prefix(str(good_prefix))


def test_truncated_bin(good_prefix):
    binary = good_prefix.with_suffix(".bin")
    binary.write_bytes(binary.read_bytes()[:-4])
    with pytest.raises(DataError, match=r"d\.bin: 16 bytes but .* describes 20 bytes .* truncated"):
        check_prefix(str(good_prefix))


def test_bin_dtype_mismatch(good_prefix):
    np.arange(10, dtype=np.int32).tofile(good_prefix.with_suffix(".bin"))  # written as int32, indexed as uint16
    with pytest.raises(DataError, match=r"d\.bin: 40 bytes .* dtype is not the uint16"):
        check_prefix(str(good_prefix))


def test_empty_document_in_index(tmp_path):
    np.arange(5, dtype=np.uint16).tofile(tmp_path / "e.bin")
    (tmp_path / "e.idx").write_bytes(index_bytes(np.array([3, 0, 2], dtype=np.int32), np.uint16))
    with pytest.raises(DataError, match=r"e\.idx: sequence 1 has length 0 \(byte offset 38\)"):
        check_prefix(str(tmp_path / "e"))


def test_missing_bin_or_idx(good_prefix):
    good_prefix.with_suffix(".bin").unlink()
    with pytest.raises(DataError, match=r"d\.bin: token file does not exist"):
        check_prefix(str(good_prefix))
    with pytest.raises(DataError, match=r"nothing\.idx: index file does not exist"):
        check_prefix(str(good_prefix.parent / "nothing"))


def test_token_id_beyond_vocab_names_file_and_offset(tmp_path):
    from olmoe_megatron.data.config import DataConfig

    tokens = np.full(64, 7, dtype=np.uint16)
    tokens[40] = 900
    tokens[-1] = TINY_EOS_ID
    tokens.tofile(tmp_path / "v.bin")
    (tmp_path / "v.idx").write_bytes(index_bytes(np.array([64], np.int32), np.uint16))
    config = DataConfig(paths=(str(tmp_path / "v"),), order="olmo", eos_token_id=TINY_EOS_ID,
                        cache_dir=str(tmp_path / "cache"), mask_repeated_ngrams=False)
    dataset = config.build(seq_length=16, num_samples=4, vocab_size=100)
    with pytest.raises(DataError, match=r"v\.bin, sample \d \(token offset 32\): token id 900 is >= vocab_size 100"):
        for index in range(4):
            dataset[index]
    with pytest.raises(DataError, match=r"token id 900 at token offset 40 is >= vocab_size 100"):
        from olmoe_megatron.data.olmo_npy import check_vocab

        check_vocab(tokens, 100, path="v.bin")


def test_undecodable_line_names_file_and_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "w1 w2"}\n{"text": "w3"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3, byte offset 33: invalid UTF-8 at byte 10"):
        tokenize(TokenizeConfig(inputs=(str(path),), output_prefix=str(tmp_path / "o"), tokenizer=tiny_tokenizer,
                                num_workers=1))
    assert not list(tmp_path.glob("o_*.bin")), "a failed shard must not look complete"
    manifest = tokenize(TokenizeConfig(inputs=(str(path),), output_prefix=str(tmp_path / "o"),
                                       tokenizer=tiny_tokenizer, num_workers=1, skip_bad_records=True))
    assert manifest["documents"] == 2 and manifest["shards"][0]["bad_records_skipped"] == 1


def test_invalid_json_names_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "w1"}\n{"text": "w2"\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2, byte offset 15: invalid JSON"):
        tokenize(TokenizeConfig(inputs=(str(path),), output_prefix=str(tmp_path / "o"), tokenizer=tiny_tokenizer,
                                num_workers=1))


def test_missing_text_field_names_line_and_keys(tmp_path, tiny_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "w1"}) + "\n" + json.dumps({"body": "w2", "id": 3}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2, .*missing text field 'text' \(record has: body, id\)"):
        tokenize(TokenizeConfig(inputs=(str(path),), output_prefix=str(tmp_path / "o"), tokenizer=tiny_tokenizer,
                                num_workers=1))


def test_empty_documents_are_skipped_counted_and_located(tmp_path, tiny_tokenizer, caplog):
    path = tmp_path / "e.jsonl"
    path.write_text('{"text": "w1"}\n{"text": "   "}\n{"text": "w2"}\n{"text": ""}\n')
    manifest = tokenize(TokenizeConfig(inputs=(str(path),), output_prefix=str(tmp_path / "o"),
                                       tokenizer=tiny_tokenizer, num_workers=1))
    assert manifest["documents"] == 2
    assert manifest["shards"][0]["empty_documents_skipped"] == 2
    assert "e.jsonl, line 2, byte offset 15" in caplog.text


def test_missing_input_files(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match=r"input file .*absent\.jsonl.* does not exist"):
        tokenize(TokenizeConfig(inputs=(str(tmp_path / "absent.jsonl"),), output_prefix=str(tmp_path / "o"),
                                tokenizer=tiny_tokenizer))
    with pytest.raises(DataError, match=r"matches no file"):
        tokenize(TokenizeConfig(inputs=(str(tmp_path / "*.jsonl"),), output_prefix=str(tmp_path / "o"),
                                tokenizer=tiny_tokenizer))
    write_jsonl(tmp_path / "x.txt", random_documents(2))
    with pytest.raises(DataError, match=r"x\.txt: unknown input type"):
        tokenize(TokenizeConfig(inputs=(str(tmp_path / "x.txt"),), output_prefix=str(tmp_path / "o"),
                                tokenizer=tiny_tokenizer))


def test_npy_problems(tmp_path):
    with pytest.raises(DataError, match=r"gone\.npy: token file does not exist"):
        open_token_file(tmp_path / "gone.npy", np.uint16)
    (tmp_path / "odd.npy").write_bytes(b"\x01\x00\x02")
    with pytest.raises(DataError, match=r"odd\.npy: 3 bytes is not a multiple of 2 .* byte offset 2"):
        open_token_file(tmp_path / "odd.npy", np.uint16)
    np.save(tmp_path / "real.npy", np.arange(4, dtype=np.uint16))
    with pytest.raises(DataError, match=r"real\.npy: has a real \.npy header"):
        open_token_file(tmp_path / "real.npy", np.uint16)
    with pytest.raises(DataError, match=r"cut\.npy: the last 3 tokens \(from token offset 2\) have no EOS"):
        document_lengths(np.array([1, 9, 2, 3, 4]), 9, path="cut.npy")


def _jsonl_bytes(count: int) -> bytes:
    return b"".join(json.dumps({"text": f"document {i} " * 20}).encode() + b"\n" for i in range(count))


@pytest.mark.parametrize("skip_bad_records", [False, True])
@pytest.mark.parametrize("kind, make, match", [
    ("jsonl.zst", lambda data: __import__("zstandard").ZstdCompressor().compress(data)[:-400],
     r"the data ends inside a zstd frame: the zstd file is truncated or damaged"),
    ("jsonl.gz", lambda data: __import__("gzip").compress(data)[:-400],
     r"the data ends before gzip's end-of-stream marker: the gzip file is truncated or damaged"),
    ("jsonl.gz", lambda data: data, r"not valid gzip .*: the gzip file is truncated or damaged"),
])
def test_a_truncated_or_foreign_compressed_file_is_an_error(tmp_path, tiny_tokenizer, kind, make, match,
                                                            skip_bad_records):
    """Even with --skip-bad-records: a damaged file is not a bad record (a truncated .zst read as
    complete kept 1,195 of 2,000 documents with exit 0)."""
    source = tmp_path / f"docs.{kind}"
    source.write_bytes(make(_jsonl_bytes(2000)))
    prefix = str(tmp_path / "out" / "c")
    with pytest.raises(DataError, match=rf"docs.{kind.replace('.', '[.]')}: {match}"):
        tokenize(TokenizeConfig(inputs=(str(source),), output_prefix=prefix, tokenizer=tiny_tokenizer,
                                num_workers=1, skip_bad_records=skip_bad_records))


def test_zstd_files_of_several_frames_read_whole(tmp_path, tiny_tokenizer):
    import zstandard

    data = _jsonl_bytes(300)
    cut = data.index(b"\n", len(data) // 3) + 7  # the second frame starts mid-line
    source = tmp_path / "docs.jsonl.zst"
    source.write_bytes(zstandard.ZstdCompressor().compress(data[:cut]) + zstandard.ZstdCompressor().compress(data[cut:]))
    manifest = tokenize(TokenizeConfig(inputs=(str(source),), output_prefix=str(tmp_path / "out" / "c"),
                                       tokenizer=tiny_tokenizer, num_workers=1))
    assert manifest["documents"] == 300


def test_an_output_prefix_under_a_file_is_an_error_before_any_work(tmp_path, tiny_tokenizer):
    source = write_jsonl(tmp_path / "in.jsonl", random_documents(3, seed=0))
    (tmp_path / "afile").write_text("")
    with pytest.raises(DataError, match=r"--output-prefix .*afile/c: cannot write shards in .*afile"):
        tokenize(TokenizeConfig(inputs=(str(source),), output_prefix=str(tmp_path / "afile" / "c"),
                                tokenizer=tiny_tokenizer, num_workers=1))
