"""Atomic writes, inter-process file locks and content hashes.

An interrupted writer must never leave a file that looks complete: everything is written under a
temporary name in the destination directory and renamed into place (rename is atomic on POSIX).
Index caches are built by whichever process takes the lock first while the others wait on it
(`fcntl.flock`), so no rank ever reads a half-written cache (Megatron-LM issues 795, 1139).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

_HASH_CHUNK_BYTES = 8 << 20


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to `final_path`; renames it into place on success.

    On an exception the temporary file is removed and `final_path` is left untouched.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final_path.name}.", suffix=".tmp", dir=final_path.parent)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        yield tmp_path
        os.replace(tmp_path, final_path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(final_path: str | os.PathLike, payload: bytes) -> None:
    """Writes `payload` to `final_path` atomically."""
    with atomic_path(final_path) as tmp:
        tmp.write_bytes(payload)


def atomic_write_text(final_path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `final_path` atomically."""
    atomic_write_bytes(final_path, text.encode("utf-8"))


@contextlib.contextmanager
def file_lock(lock_path: str | os.PathLike) -> Iterator[None]:
    """Holds an exclusive advisory lock on `lock_path` (created if absent) for the block.

    Works across processes on one machine and on shared filesystems that support flock.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def default_cache_root() -> Path:
    """`$OLMOE_CACHE`, else `~/.cache/olmoe_megatron`."""
    env = os.environ.get("OLMOE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "olmoe_megatron"
