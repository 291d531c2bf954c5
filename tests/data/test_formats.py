"""Formats: Megatron <-> OLMo .npy conversion, OLMo document splitting, zarr archives bit-exact."""

import numpy as np
import pytest
from data_testutil import random_token_documents, write_npy_tokens

from olmoe_megatron.data.format_conversion import megatron_to_olmo, olmo_to_megatron
from olmoe_megatron.data.errors import DataError
from olmoe_megatron.data.megatron_format import check_prefix, index_bytes
from olmoe_megatron.data.olmo_npy import document_lengths, open_token_file
from olmoe_megatron.data.zarr_archive import pack, unpack

EOS = 50279


def test_olmo_npy_documents_split_at_eos(tmp_path):
    documents = random_token_documents(20, seed=0, eos=EOS)
    path = write_npy_tokens(tmp_path / "part-0.npy", documents)
    tokens = open_token_file(path, np.uint16)
    assert document_lengths(tokens, EOS).tolist() == [len(d) for d in documents]


def test_olmo_to_megatron_to_olmo_round_trip(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    documents = random_token_documents(30, seed=1, eos=EOS)
    source = write_npy_tokens(tmp_path / "part-0.npy", documents)
    assert olmo_to_megatron(source, str(tmp_path / "m"), eos_token_id=EOS) == 30
    dataset = IndexedDataset(str(tmp_path / "m"))
    assert [dataset[i].tolist() for i in range(len(dataset))] == documents
    assert megatron_to_olmo(str(tmp_path / "m"), tmp_path / "back.npy", eos_token_id=EOS) == sum(map(len, documents))
    assert (tmp_path / "back.npy").read_bytes() == (tmp_path / "part-0.npy").read_bytes()


def test_uint32_npy_to_int32_megatron(tmp_path):
    documents = [[70000, 3, 9], [5, 9]]
    source = write_npy_tokens(tmp_path / "wide.npy", documents, dtype=np.uint32)
    olmo_to_megatron(source, str(tmp_path / "w"), eos_token_id=9, source_dtype="uint32", dtype="int32")
    assert check_prefix(str(tmp_path / "w")).dtype == np.int32
    with pytest.raises(DataError, match=r"token id 70000 at token offset 0 does not fit uint16"):
        olmo_to_megatron(source, str(tmp_path / "n"), eos_token_id=9, source_dtype="uint32", dtype="uint16")


def test_megatron_documents_without_eos_cannot_become_olmo(tmp_path):
    np.array([1, 2, EOS, 4, 5], dtype=np.uint16).tofile(tmp_path / "x.bin")
    (tmp_path / "x.idx").write_bytes(index_bytes(np.array([3, 2], np.int32), np.uint16))
    with pytest.raises(DataError, match=r"x\.bin: document 1 \(ending at token offset 4\) does not end with EOS"):
        megatron_to_olmo(str(tmp_path / "x"), tmp_path / "x.npy", eos_token_id=EOS)


def test_zarr_pack_unpack_is_bit_exact(tmp_path):
    documents = random_token_documents(50, seed=2, eos=EOS)
    npy = write_npy_tokens(tmp_path / "part-0.npy", documents)
    olmo_to_megatron(npy, str(tmp_path / "m"), eos_token_id=EOS)
    names = pack([str(tmp_path / "m"), npy], tmp_path / "a.zarr", chunk_tokens=1000)
    assert names == ["m.bin", "m.idx", "part-0.npy"]
    written = unpack(tmp_path / "a.zarr", tmp_path / "out")
    assert sorted(p.name for p in written) == sorted(names)
    for name, original in (("m.bin", tmp_path / "m.bin"), ("m.idx", tmp_path / "m.idx"), ("part-0.npy", tmp_path / "part-0.npy")):
        assert (tmp_path / "out" / name).read_bytes() == original.read_bytes()
    check_prefix(str(tmp_path / "out" / "m"))
    with pytest.raises(DataError, match="already exists"):
        pack([npy], tmp_path / "a.zarr")


def test_zarr_unpack_detects_a_corrupt_archive(tmp_path):
    import zarr

    npy = write_npy_tokens(tmp_path / "p.npy", random_token_documents(5, seed=3, eos=EOS))
    pack([npy], tmp_path / "a.zarr")
    array = zarr.open_group(str(tmp_path / "a.zarr"), mode="r+")["p.npy"]
    array[3] = array[3] + 1
    with pytest.raises(DataError, match=r"a\.zarr/p\.npy: unpacked bytes have SHA-256"):
        unpack(tmp_path / "a.zarr", tmp_path / "out")
    assert not (tmp_path / "out" / "p.npy").exists()
