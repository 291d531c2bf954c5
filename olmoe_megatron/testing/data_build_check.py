"""Every rank builds the same DataConfig at once into one cache (as the trainer does): what each built
and what each read."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch.distributed as dist

_BUILD_MESSAGES = ("built ", "trained a ")  # index caches and the demo corpus; the demo BPE


class _BuildLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.builds: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.name.endswith(("index_cache", "corpus")) and message.startswith(_BUILD_MESSAGES):
            self.builds.append(message)


def concurrent_build(data_dicts: dict[str, dict], *, seq_length: int, num_samples: int, vocab_sizes: dict[str, int],
                     tokenizer_cache: str) -> dict:
    """Builds each named DataConfig on every rank at the same moment; returns a digest of all its
    samples per config and the build log messages of this rank."""
    from olmoe_megatron.data.config import DataConfig

    root = logging.getLogger()
    handler, level = _BuildLog(), root.level
    saved_cache = os.environ.get("OLMOE_CACHE")
    os.environ["OLMOE_CACHE"] = tokenizer_cache  # the demo BPE's cache (default_cache_root)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        digests = {}
        for name, data_dict in data_dicts.items():
            config = DataConfig.from_dict(data_dict)
            dist.barrier()  # start together: the file locks alone must keep the builds apart
            dataset = config.build(seq_length=seq_length, num_samples=num_samples, vocab_size=vocab_sizes[name])
            digest = hashlib.sha256()
            for index in range(len(dataset)):
                for array in dataset[index].values():
                    digest.update(array.tobytes())
            digests[name] = digest.hexdigest()
        dist.barrier()
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        if saved_cache is None:
            os.environ.pop("OLMOE_CACHE", None)
        else:
            os.environ["OLMOE_CACHE"] = saved_cache
    return {"digests": digests, "builds": handler.builds}


def list_files(*roots: str) -> list[str]:
    """Every file (and link) under `roots`, as sorted paths relative to their root."""
    return sorted(str(path.relative_to(root)) for root in map(Path, roots) for path in root.rglob("*")
                  if not path.is_dir())
