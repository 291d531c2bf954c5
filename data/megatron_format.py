"""Megatron's indexed token format (.bin/.idx): a streaming writer and a validating reader.

.idx layout (little endian): magic b"MMIDIDX\\x00\\x00", <Q version 1, <B dtype code, <Q sequence
count N, <Q document count D (= documents + 1), int32[N] lengths, int64[N] byte pointers,
int64[D] document indices (first 0, last N). The .bin is the raw tokens, no header.

Reading goes through `megatron.core.datasets.indexed_dataset.IndexedDataset`; `check_prefix` runs
first because Megatron's own checks are bare asserts that do not say what is wrong or where.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
from pathlib import Path

import numpy as np

from olmoe_megatron.data.errors import DataError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_BYTES = len(INDEX_MAGIC) + 8 + 1 + 8 + 8  # 34

# Megatron-Core's DType codes (indexed_dataset.DType).
DTYPE_BY_CODE: dict[int, np.dtype] = {
    1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16), 4: np.dtype(np.int32),
    5: np.dtype(np.int64), 6: np.dtype(np.float64), 7: np.dtype(np.float32), 8: np.dtype(np.uint16),
}
CODE_BY_DTYPE = {dtype: code for code, dtype in DTYPE_BY_CODE.items()}
TOKEN_DTYPES = (np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.int16), np.dtype(np.int32),
                np.dtype(np.int64), np.dtype(np.uint16))

# Megatron-LM switches to int32 at this vocabulary size (a margin below 2**16).
UINT16_VOCAB_LIMIT = 65_500


def token_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when the vocabulary is under 65,500 ids, else int32 (Megatron-LM's rule)."""
    return np.dtype(np.uint16) if vocab_size < UINT16_VOCAB_LIMIT else np.dtype(np.int32)


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.idx")


def index_bytes(lengths: np.ndarray, dtype: np.dtype) -> bytes:
    """The complete .idx file for documents of `lengths` tokens (one sequence per document)."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(lengths, dtype=np.int32)
    count = int(lengths.shape[0])
    pointers = np.zeros(count, dtype=np.int64)
    if count:
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    document_indices = np.arange(count + 1, dtype=np.int64)
    header = INDEX_MAGIC + struct.pack("<Q", INDEX_VERSION) + struct.pack("<B", CODE_BY_DTYPE[dtype])
    header += struct.pack("<Q", count) + struct.pack("<Q", count + 1)
    return header + lengths.tobytes() + pointers.tobytes() + document_indices.tobytes()


@dataclasses.dataclass(frozen=True)
class IndexHeader:
    """What a validated .idx says about its token file."""

    prefix: str
    dtype: np.dtype
    num_sequences: int
    num_documents: int
    num_tokens: int


def read_index_header(prefix: str | os.PathLike) -> tuple[IndexHeader, int]:
    """Parses and checks the fixed .idx header; returns it and the byte offset of the arrays."""
    path = idx_path(prefix)
    if not path.is_file():
        raise DataError(f"{path}: index file does not exist (expected {prefix}.idx next to {prefix}.bin)")
    with open(path, "rb") as handle:
        raw = handle.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: truncated at byte {len(raw)}; a Megatron .idx header has {HEADER_BYTES} bytes")
    if raw[:9] != INDEX_MAGIC:
        raise DataError(f"{path}: wrong magic {raw[:9]!r} at byte offset 0, expected {INDEX_MAGIC!r}; "
                        f"not a Megatron .idx file")
    (version,) = struct.unpack_from("<Q", raw, 9)
    if version != INDEX_VERSION:
        raise DataError(f"{path}: version {version} at byte offset 9 is not supported; expected {INDEX_VERSION}")
    (code,) = struct.unpack_from("<B", raw, 17)
    if code not in DTYPE_BY_CODE or DTYPE_BY_CODE[code] not in TOKEN_DTYPES:
        raise DataError(f"{path}: dtype code {code} at byte offset 17 is not an integer token dtype; "
                        f"valid codes: {', '.join(f'{c} ({DTYPE_BY_CODE[c]})' for c in sorted(CODE_BY_DTYPE.values()) if DTYPE_BY_CODE[c] in TOKEN_DTYPES)}")
    num_sequences, num_document_entries = struct.unpack_from("<QQ", raw, 18)
    header = IndexHeader(str(prefix), DTYPE_BY_CODE[code], num_sequences, num_document_entries - 1, -1)
    return header, HEADER_BYTES


def check_prefix(prefix: str | os.PathLike, *, check_lengths: bool = True) -> IndexHeader:
    """Validates a .bin/.idx pair before Megatron opens it.

    Checks the magic, version, dtype code, the .idx size against its counts, the .bin size against
    the last pointer and length (a truncated or mismatched-dtype .bin), document indices, and (with
    `check_lengths`) that no sequence is empty.

    Raises:
        DataError: naming the file and the offset or sequence index of the first problem.
    """
    header, offset = read_index_header(prefix)
    path = idx_path(prefix)
    count, docs = header.num_sequences, header.num_documents + 1
    expected = offset + count * (4 + 8) + docs * 8
    actual = path.stat().st_size
    if actual != expected:
        raise DataError(f"{path}: {actual} bytes but the header (at byte offset 18) announces {count} sequences "
                        f"and {docs} document entries = {expected} bytes; the file is truncated or corrupt")
    index = np.memmap(path, dtype=np.uint8, mode="r")
    lengths = np.frombuffer(index, dtype=np.int32, count=count, offset=offset)
    pointers = np.frombuffer(index, dtype=np.int64, count=count, offset=offset + 4 * count)
    doc_indices = np.frombuffer(index, dtype=np.int64, count=docs, offset=offset + 12 * count)
    if docs < 1 or doc_indices[0] != 0 or doc_indices[-1] != count:
        raise DataError(f"{path}: document indices at byte offset {offset + 12 * count} must start at 0 and end "
                        f"at the sequence count {count}; the file is corrupt")
    if check_lengths and count:
        bad = np.flatnonzero(lengths <= 0)
        if bad.size:
            raise DataError(f"{path}: sequence {int(bad[0])} has length {int(lengths[bad[0]])} (byte offset "
                            f"{offset + 4 * int(bad[0])}); empty documents are not allowed")
    itemsize = header.dtype.itemsize
    end_bytes = int(pointers[-1]) + int(lengths[-1]) * itemsize if count else 0
    bin_file = bin_path(prefix)
    if not bin_file.is_file():
        raise DataError(f"{bin_file}: token file does not exist (its index {path} does)")
    bin_size = bin_file.stat().st_size
    if bin_size != end_bytes:
        hint = ("the .bin is truncated" if bin_size < end_bytes else "the .bin has trailing bytes")
        if bin_size % itemsize or end_bytes and bin_size in (end_bytes // itemsize * 2, end_bytes // itemsize * 4):
            hint += f", or its dtype is not the {header.dtype} the .idx declares (byte offset 17)"
        raise DataError(f"{bin_file}: {bin_size} bytes but {path} describes {end_bytes} bytes "
                        f"({header.dtype}); {hint}")
    num_tokens = end_bytes // itemsize
    return dataclasses.replace(header, num_tokens=num_tokens)


def open_indexed_dataset(prefix: str | os.PathLike):
    """Validates then opens `prefix` with Megatron-Core's IndexedDataset (memory-mapped)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    check_prefix(prefix)
    return IndexedDataset(str(prefix), multimodal=False, mmap=True)


class ShardWriter:
    """Streams documents into `<prefix>.bin` and writes `<prefix>.idx` on `finish()`.

    Both files are written under temporary names and renamed when complete (.bin first, .idx last),
    so a reader never sees an index over a partial token file. The SHA-256 of each file is computed
    while writing.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in TOKEN_DTYPES:
            raise DataError(f"token dtype {self.dtype} is not an integer token dtype")
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_bin = self.prefix.parent / f".{self.prefix.name}.bin.tmp"
        self._tmp_idx = self.prefix.parent / f".{self.prefix.name}.idx.tmp"
        self._bin = open(self._tmp_bin, "wb")
        self._bin_hash = hashlib.sha256()
        self._lengths: list[np.ndarray] = []
        self.num_tokens = 0
        self.num_documents = 0

    def add_documents(self, flat_tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Appends documents given as one flat token array and their lengths (EOS included)."""
        payload = np.ascontiguousarray(flat_tokens, dtype=self.dtype).tobytes()
        self._bin.write(payload)
        self._bin_hash.update(payload)
        self._lengths.append(np.asarray(lengths, dtype=np.int32))
        self.num_tokens += int(flat_tokens.shape[0])
        self.num_documents += int(lengths.shape[0])

    def finish(self) -> dict[str, str]:
        """Closes and renames both files into place; returns their SHA-256 digests."""
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        payload = index_bytes(lengths, self.dtype)
        self._tmp_idx.write_bytes(payload)
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(self._tmp_idx, idx_path(self.prefix))
        return {"bin_sha256": self._bin_hash.hexdigest(), "idx_sha256": hashlib.sha256(payload).hexdigest()}

    def abort(self) -> None:
        """Closes and deletes the temporary files."""
        self._bin.close()
        for tmp in (self._tmp_bin, self._tmp_idx):
            if tmp.exists():
                tmp.unlink()
