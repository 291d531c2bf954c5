"""zarr archives of token files: compressed, chunked, and unpacked back to memmaps bit-exactly.

Measured on this project's machines: zstd-compressed zarr is about 3x smaller than raw tokens but
random 2049-token reads cost 0.7 ms against 2.8 us from a memmap, so archives are for storage and
transfer only; the training path always reads the unpacked memmaps.

Each packed file becomes one 1-D array named after the file, with attributes recording its name,
byte size, element dtype and SHA-256; unpacking checks the digest.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from olmoe_megatron.data.errors import DataError
from olmoe_megatron.data.fileutil import atomic_path
from olmoe_megatron.data.megatron_format import bin_path, check_prefix, idx_path
from olmoe_megatron.data.olmo_npy import NPY_DTYPES, open_token_file

logger = logging.getLogger(__name__)

ARCHIVE_FORMAT = "olmoe-token-archive-v1"
DEFAULT_CHUNK_TOKENS = 1 << 20


def _files_to_pack(path: str, npy_dtype: str) -> list[tuple[Path, np.dtype]]:
    """(file, element dtype) pairs for a Megatron prefix (its .bin and .idx) or an OLMo .npy file."""
    if path.endswith(".npy"):
        open_token_file(path, NPY_DTYPES[npy_dtype])
        return [(Path(path), NPY_DTYPES[npy_dtype])]
    prefix = path[: -len(".bin")] if path.endswith((".bin", ".idx")) else path
    header = check_prefix(prefix, check_lengths=False)
    return [(bin_path(prefix), header.dtype), (idx_path(prefix), np.dtype(np.uint8))]


def _create_array(group, name: str, *, shape: tuple[int], dtype: np.dtype, chunks: int, clevel: int):
    import zarr

    if hasattr(group, "create_array"):  # zarr 3
        codec = zarr.codecs.BloscCodec(cname="zstd", clevel=clevel, shuffle="bitshuffle")
        return group.create_array(name, shape=shape, dtype=dtype, chunks=(chunks,), compressors=codec)
    from numcodecs import Blosc  # zarr 2

    return group.create_dataset(name, shape=shape, dtype=dtype, chunks=(chunks,),
                                compressor=Blosc(cname="zstd", clevel=clevel, shuffle=Blosc.BITSHUFFLE))


def pack(paths: list[str], store: str | os.PathLike, *, npy_dtype: str = "uint16",
         chunk_tokens: int = DEFAULT_CHUNK_TOKENS, clevel: int = 5) -> list[str]:
    """Packs Megatron prefixes and/or OLMo .npy files into a new zarr store.

    Args:
        paths: Megatron prefixes (or their .bin/.idx paths) and OLMo .npy files.
        store: Directory of the zarr store to create (must not exist yet).
        npy_dtype: Element dtype of the .npy files.
        chunk_tokens: Elements per chunk.
        clevel: zstd level.

    Returns:
        The names of the packed arrays.
    """
    import zarr

    store = Path(store)
    if store.exists():
        raise DataError(f"{store}: archive already exists; choose a new path or remove it")
    files = [item for path in paths for item in _files_to_pack(path, npy_dtype)]
    names = [file.name for file, _ in files]
    if len(set(names)) != len(names):
        raise DataError(f"two inputs share a file name ({', '.join(sorted(names))}); pack them into separate archives")
    group = zarr.open_group(str(store), mode="w")
    group.attrs["format"] = ARCHIVE_FORMAT
    for file, dtype in files:
        data = np.memmap(file, dtype=dtype, mode="r") if file.stat().st_size else np.zeros(0, dtype)
        chunk = max(1, min(chunk_tokens, data.shape[0]))
        array = _create_array(group, file.name, shape=data.shape, dtype=dtype, chunks=chunk, clevel=clevel)
        digest = hashlib.sha256()
        step = chunk * max(1, (64 << 20) // (chunk * dtype.itemsize))
        for start in range(0, data.shape[0], step):
            block = np.asarray(data[start:start + step])
            array[start:start + block.shape[0]] = block
            digest.update(block.tobytes())
        array.attrs.update({"file_name": file.name, "dtype": str(dtype), "nbytes": int(file.stat().st_size),
                            "sha256": digest.hexdigest()})
        logger.info("packed %s (%d bytes) into %s", file, file.stat().st_size, store)
    return names


def unpack(store: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Writes every file of an archive back into `out_dir`, bit-exact (checked by SHA-256).

    Returns:
        The written paths.
    """
    import zarr

    store = Path(store)
    if not store.exists():
        raise DataError(f"{store}: archive does not exist")
    group = zarr.open_group(str(store), mode="r")
    if group.attrs.get("format") != ARCHIVE_FORMAT:
        raise DataError(f"{store}: not an olmoe token archive (format attribute {group.attrs.get('format')!r})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in sorted(group.array_keys()):
        array = group[name]
        attrs = dict(array.attrs)
        target = out_dir / attrs["file_name"]
        digest = hashlib.sha256()
        step = max(1, (64 << 20) // np.dtype(attrs["dtype"]).itemsize)
        with atomic_path(target) as tmp, open(tmp, "wb") as handle:
            for start in range(0, array.shape[0], step):
                payload = np.asarray(array[start:start + step]).tobytes()
                digest.update(payload)
                handle.write(payload)
            handle.flush()
            if digest.hexdigest() != attrs["sha256"]:
                raise DataError(f"{store}/{name}: unpacked bytes have SHA-256 {digest.hexdigest()}, the archive "
                                f"recorded {attrs['sha256']}; the archive is corrupt")
        written.append(target)
        logger.info("unpacked %s to %s", name, target)
    return written
