"""Scenarios for the training tests: fixed synthetic token files and whole training runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from olmoe_megatron.data.megatron_format import ShardWriter

EOS = 50279


def write_synthetic_corpus(prefix: str | Path, *, num_documents: int = 400, vocab_size: int = 50280,
                           seed: int = 0) -> str:
    """Documents of 20..300 Zipf-distributed token ids (learnable) ending in EOS, as .bin/.idx."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 300, num_documents)
    docs = [np.append(np.minimum(rng.zipf(1.3, n - 1), 2000) + 100, EOS) for n in lengths]
    writer = ShardWriter(prefix, np.uint16 if vocab_size < 65500 else np.int32)
    writer.add_documents(np.concatenate(docs), lengths)
    writer.finish()
    return str(prefix)


def train_run(run_dict: dict, *, env: dict[str, str] | None = None) -> int:
    """Trains RunConfig.from_dict(run_dict) on this pool's ranks; returns the exit code."""
    from olmoe_megatron.run_config import RunConfig
    from olmoe_megatron.training.trainer import train

    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        return train(RunConfig.from_dict(run_dict))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def read_metrics(path: str | Path, *, kind: str = "train") -> list[dict]:
    """The training records of a metrics JSONL file (kind='eval': its evaluation records)."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("kind", "train") == kind]
