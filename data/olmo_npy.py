"""OLMo's token files: headerless uint16/uint32 arrays named *.npy, documents ending with EOS.

`np.load` fails on them (there is no .npy header); `np.memmap` reads them. OLMoE-mix-0924 ships
uint16 files, and every document ends with EOS 50279 (no BOS).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from olmoe_megatron.data.errors import DataError

NPY_DTYPES = {"uint16": np.dtype(np.uint16), "uint32": np.dtype(np.uint32)}
_SCAN_TOKENS = 64 << 20


def open_token_file(path: str | os.PathLike, dtype: str | np.dtype) -> np.memmap:
    """Memory-maps a headerless token file, checking it exists, is non-empty and fits the dtype.

    Raises:
        DataError: missing file, empty file, or a size that is not a multiple of the item size.
    """
    dtype = np.dtype(dtype)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: token file does not exist")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: token file is empty")
    if size % dtype.itemsize:
        raise DataError(f"{path}: {size} bytes is not a multiple of {dtype.itemsize} ({dtype}); the file is "
                        f"truncated at byte offset {size - size % dtype.itemsize} or its dtype is not {dtype}")
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic == b"\x93NUMPY":
        raise DataError(f"{path}: has a real .npy header at byte offset 0; OLMo token files are headerless "
                        f"raw arrays (convert it with np.load(...).tofile(path))")
    return np.memmap(path, dtype=dtype, mode="r")


def document_lengths(tokens: np.ndarray, eos_token_id: int, *, path: str | os.PathLike = "<tokens>") -> np.ndarray:
    """Lengths (EOS included) of the documents of a token array split after each EOS.

    Scans in chunks so a 100B-token memmap never needs a 100B-element temporary.

    Raises:
        DataError: the array does not end with EOS (the last document is cut off), naming the offset
            of the trailing tokens.
    """
    ends: list[np.ndarray] = []
    for start in range(0, tokens.shape[0], _SCAN_TOKENS):
        chunk = np.asarray(tokens[start:start + _SCAN_TOKENS])
        ends.append(np.flatnonzero(chunk == eos_token_id).astype(np.int64) + start + 1)
    boundaries = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    last_end = int(boundaries[-1]) if boundaries.size else 0
    if last_end != tokens.shape[0]:
        raise DataError(f"{path}: the last {tokens.shape[0] - last_end} tokens (from token offset {last_end}) "
                        f"have no EOS {eos_token_id} after them; the file is truncated, or pass the "
                        f"right eos_token_id")
    return np.diff(boundaries, prepend=0)


def check_vocab(tokens: np.ndarray, vocab_size: int, *, path: str | os.PathLike = "<tokens>") -> None:
    """Raises DataError naming the token offset of the first id >= `vocab_size`."""
    for start in range(0, tokens.shape[0], _SCAN_TOKENS):
        chunk = np.asarray(tokens[start:start + _SCAN_TOKENS])
        bad = np.flatnonzero(chunk >= vocab_size)
        if bad.size:
            offset = start + int(bad[0])
            raise DataError(f"{path}: token id {int(chunk[bad[0]])} at token offset {offset} is >= "
                            f"vocab_size {vocab_size}; wrong tokenizer or dtype for this file")
