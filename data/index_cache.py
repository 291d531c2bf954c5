"""Memory-mapped index caches keyed by a hash of their description, built once under a file lock.

Every rank calls `cached_arrays` with the same description. The first to take the lock builds the
arrays into temporary files, renames them into place and writes the description file last; the
others wait on the lock and then map the finished files. No rank ever reads a partial cache, and
no barrier or rank-0 special case is needed (Megatron-LM issues 795 and 1139 are rank-0 races).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from olmoe_megatron.data.fileutil import atomic_path, atomic_write_text, default_cache_root, file_lock

logger = logging.getLogger(__name__)


def default_index_cache_dir() -> Path:
    return default_cache_root() / "index"


def description_hash(description: dict) -> str:
    """MD5 of the canonical JSON of a description (what the cached arrays are a function of)."""
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()


def cached_arrays(cache_dir: str | os.PathLike, *, kind: str, description: dict, names: tuple[str, ...],
                  build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Returns the arrays `names` memory-mapped from the cache, building them once if absent.

    Args:
        cache_dir: Cache directory (shared by all ranks).
        kind: Short label in the file names (e.g. "olmo-order").
        description: JSON-able value the arrays are a function of; its hash keys the cache.
        names: Array names `build` returns.
        build: Computes the arrays; called by at most one process per description.

    Returns:
        name -> read-only memory-mapped array.
    """
    cache_dir = Path(cache_dir)
    key = f"{kind}-{description_hash(description)}"
    paths = {name: cache_dir / f"{key}-{name}.npy" for name in names}
    marker = cache_dir / f"{key}-description.json"
    if not marker.is_file():
        with file_lock(cache_dir / f"{key}.lock"):
            if not marker.is_file():
                started = time.monotonic()
                arrays = build()
                for name in names:
                    with atomic_path(paths[name]) as tmp:
                        with open(tmp, "wb") as handle:
                            np.save(handle, arrays[name], allow_pickle=False)
                atomic_write_text(marker, json.dumps(description, indent=1, sort_keys=True, default=str))
                logger.info("built %s index cache %s in %.2f s", kind, key, time.monotonic() - started)
    return {name: np.load(paths[name], mmap_mode="r", allow_pickle=False) for name in names}
