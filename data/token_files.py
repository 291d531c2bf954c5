"""Turns user paths into token files: Megatron prefixes, OLMo .npy files, or tokenize manifests.

A user path is one weight group. It may be a Megatron prefix (or its .bin/.idx), an OLMo .npy file,
or a `*.manifest.json` written by `olmoe prep tokenize` (all its shards). For Megatron's order an
OLMo .npy file is given a cached .idx (documents split at EOS) next to a symlink to the file, so
GPTDataset reads it without a copy.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from olmoe_megatron.data.errors import DataError
from olmoe_megatron.data.fileutil import atomic_path, file_lock
from olmoe_megatron.data.index_cache import description_hash
from olmoe_megatron.data.megatron_format import check_prefix, index_bytes
from olmoe_megatron.data.olmo_npy import NPY_DTYPES, document_lengths, open_token_file


@dataclasses.dataclass(frozen=True)
class TokenFile:
    """One token file: its Megatron prefix (real or cached) and its raw token array's path and dtype."""

    raw_path: str
    dtype: str
    num_tokens: int
    megatron_prefix: str | None


def expand_path(path: str, file_format: str) -> tuple[str, list[str]]:
    """(format, files) for one user path: a manifest expands to its Megatron shards."""
    if path.endswith(".manifest.json"):
        from olmoe_megatron.data.tokenize_text import shard_prefixes

        if not os.path.isfile(path):
            raise DataError(f"manifest {path!r} does not exist")
        return "megatron", shard_prefixes(path)
    if file_format == "megatron" and path.endswith((".bin", ".idx")):
        return "megatron", [path[:-4]]
    return file_format, [path]


def megatron_file(prefix: str) -> TokenFile:
    header = check_prefix(prefix)
    return TokenFile(f"{prefix}.bin", str(header.dtype), header.num_tokens, prefix)


def npy_file(path: str, *, dtype: str, eos_token_id: int, index_cache_dir: str | None) -> TokenFile:
    """An OLMo .npy file; with `index_cache_dir`, also a cached Megatron prefix over it."""
    tokens = open_token_file(path, NPY_DTYPES[dtype])
    if index_cache_dir is None:
        return TokenFile(path, dtype, int(tokens.shape[0]), None)
    return TokenFile(path, dtype, int(tokens.shape[0]),
                     npy_as_megatron_prefix(path, tokens, eos_token_id=eos_token_id, cache_dir=index_cache_dir))


def npy_as_megatron_prefix(path: str, tokens: np.ndarray, *, eos_token_id: int, cache_dir: str) -> str:
    """A cached `<prefix>.idx` over `path` split at EOS, with `<prefix>.bin` a symlink to `path`."""
    stat = os.stat(path)
    key = description_hash({"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                            "dtype": str(tokens.dtype), "eos": eos_token_id})
    prefix = Path(cache_dir) / f"npy-{Path(path).stem}-{key}"
    idx = Path(f"{prefix}.idx")
    if not idx.is_file():
        with file_lock(f"{prefix}.lock"):
            if not idx.is_file():
                lengths = document_lengths(tokens, eos_token_id, path=path)
                link = Path(f"{prefix}.bin")
                if link.is_symlink() or link.exists():
                    link.unlink()
                link.symlink_to(os.path.abspath(path))
                with atomic_path(idx) as tmp:
                    tmp.write_bytes(index_bytes(lengths.astype(np.int32), tokens.dtype))
    return str(prefix)
