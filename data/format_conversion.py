"""Conversion between Megatron .bin/.idx and OLMo headerless .npy token files, both ways.

Both formats store the tokens of consecutive documents as one raw array; they differ in the index
(.idx vs. EOS boundaries) and the dtype. Conversion streams in chunks and checks every id fits.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from olmoe_megatron.data.errors import DataError
from olmoe_megatron.data.fileutil import atomic_path
from olmoe_megatron.data.megatron_format import CODE_BY_DTYPE, bin_path, check_prefix, idx_path, index_bytes
from olmoe_megatron.data.olmo_npy import NPY_DTYPES, document_lengths, open_token_file

logger = logging.getLogger(__name__)

_COPY_TOKENS = 16 << 20


def _copy_tokens(source: np.ndarray, target: Path, dtype: np.dtype, *, source_name: str) -> None:
    """Writes `source` as raw `dtype` tokens to `target`, failing on ids the dtype cannot hold."""
    limit = np.iinfo(dtype).max
    with open(target, "wb") as handle:
        for start in range(0, source.shape[0], _COPY_TOKENS):
            chunk = np.asarray(source[start:start + _COPY_TOKENS])
            if chunk.size and (int(chunk.max()) > limit or int(chunk.min()) < 0):
                bad = int(np.flatnonzero((chunk > limit) | (chunk < 0))[0])
                raise DataError(f"{source_name}: token id {int(chunk[bad])} at token offset {start + bad} "
                                f"does not fit {dtype}; choose a wider dtype")
            handle.write(chunk.astype(dtype, copy=False).tobytes())


def megatron_to_olmo(prefix: str | os.PathLike, out_path: str | os.PathLike, *, eos_token_id: int,
                     dtype: str = "uint16") -> int:
    """Writes the tokens of `prefix`.bin/.idx as an OLMo headerless .npy file.

    Every document must already end with `eos_token_id` (as `olmoe prep tokenize` writes them),
    else the documents would merge in the OLMo file.

    Returns:
        The number of tokens written.
    """
    header = check_prefix(prefix)
    tokens = np.memmap(bin_path(prefix), dtype=header.dtype, mode="r") if header.num_tokens else np.zeros(0, header.dtype)
    index = np.memmap(idx_path(prefix), dtype=np.uint8, mode="r")
    lengths = np.frombuffer(index, dtype=np.int32, count=header.num_sequences, offset=34)
    ends = np.cumsum(lengths.astype(np.int64)) - 1
    missing = np.flatnonzero(np.asarray(tokens[ends]) != eos_token_id) if ends.size else ends
    if missing.size:
        raise DataError(f"{bin_path(prefix)}: document {int(missing[0])} (ending at token offset "
                        f"{int(ends[missing[0]])}) does not end with EOS {eos_token_id}; OLMo files split "
                        f"documents at EOS only")
    with atomic_path(out_path) as tmp:
        _copy_tokens(tokens, tmp, NPY_DTYPES[dtype], source_name=str(bin_path(prefix)))
    logger.info("wrote %d tokens from %s to %s (%s)", header.num_tokens, prefix, out_path, dtype)
    return header.num_tokens


def olmo_to_megatron(npy_path: str | os.PathLike, out_prefix: str | os.PathLike, *, eos_token_id: int,
                     source_dtype: str = "uint16", dtype: str = "uint16") -> int:
    """Writes an OLMo .npy token file as `out_prefix`.bin/.idx, one document per EOS.

    Returns:
        The number of documents written.
    """
    tokens = open_token_file(npy_path, NPY_DTYPES[source_dtype])
    lengths = document_lengths(tokens, eos_token_id, path=npy_path)
    target_dtype = np.dtype(dtype)
    if target_dtype not in CODE_BY_DTYPE:
        raise DataError(f"dtype {dtype} has no Megatron dtype code; use uint16 or int32")
    if lengths.size and int(lengths.max()) > np.iinfo(np.int32).max:
        raise DataError(f"{npy_path}: a document of {int(lengths.max())} tokens exceeds Megatron's int32 lengths")
    with atomic_path(bin_path(out_prefix)) as tmp:
        _copy_tokens(tokens, tmp, target_dtype, source_name=str(npy_path))
    with atomic_path(idx_path(out_prefix)) as tmp:
        tmp.write_bytes(index_bytes(lengths.astype(np.int32), target_dtype))
    logger.info("wrote %d documents from %s to %s.bin/.idx", lengths.size, npy_path, out_prefix)
    return int(lengths.size)
