"""Loader throughput: 4096-token samples per second from TokenDataset on a warm page cache.

Writes a synthetic token file (random ids, an EOS every ~1,000 tokens) as Megatron .bin/.idx and
reads it in both sample orders, through TokenDataset alone and through MicroBatchIterator (torch
collation), after one pass over the file to warm the page cache. The ratio compares with what the
trainer consumes at --trainer-tokens-per-s.

Usage: python benchmarks/loader.py --json out.json [--tokens 200e6] [--seconds 5]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SEQ_LENGTH = 4096
EOS = 50279


def write_tokens(prefix: Path, num_tokens: int) -> None:
    from olmoe_megatron.data.megatron_format import index_bytes

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, EOS, num_tokens, dtype=np.uint16)
    ends = np.unique(np.concatenate([np.cumsum(rng.integers(200, 1800, num_tokens // 200)), [num_tokens]]))
    ends = ends[ends <= num_tokens]
    tokens[ends - 1] = EOS
    tokens.tofile(f"{prefix}.bin")
    Path(f"{prefix}.idx").write_bytes(index_bytes(np.diff(ends, prepend=0).astype(np.int32), np.uint16))


def rate(read_one, seconds: float) -> float:
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        read_one(count)
        count += 1
    return count / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--tokens", type=float, default=200e6)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--trainer-tokens-per-s", type=float, default=5000.0)
    args = parser.parse_args()

    from olmoe_megatron.data.config import DataConfig
    from olmoe_megatron.data.loader import MicroBatchIterator

    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        prefix = Path(tmp) / "synthetic"
        write_tokens(prefix, int(args.tokens))
        Path(f"{prefix}.bin").read_bytes()  # warm the page cache
        num_samples = int(args.tokens) // SEQ_LENGTH - 1
        for order in ("megatron", "olmo"):
            dataset = DataConfig(paths=(str(prefix),), order=order, cache_dir=f"{tmp}/cache").build(
                seq_length=SEQ_LENGTH, num_samples=num_samples, vocab_size=50304)
            rows[f"{order} TokenDataset"] = rate(lambda i: dataset[i % num_samples], args.seconds)
            batches = iter(MicroBatchIterator(dataset, global_batch_size=8, micro_batch_size=4, dp_rank=0, dp_size=1))
            rows[f"{order} MicroBatchIterator"] = 8 * rate(lambda i: next(batches), args.seconds)
    trainer_samples_per_s = args.trainer_tokens_per_s / SEQ_LENGTH
    samples_per_s = min(rows.values())
    print(f"{'reader':<34}{'samples/s':>12}{'x trainer':>12}")
    for name, value in rows.items():
        print(f"{name:<34}{value:>12.0f}{value / trainer_samples_per_s:>12.0f}")
    result = {"samples_per_s": round(samples_per_s, 1), "seq_length": SEQ_LENGTH, "tokens": int(args.tokens),
              "trainer_tokens_per_s": args.trainer_tokens_per_s,
              "ratio_to_trainer": round(samples_per_s / trainer_samples_per_s, 1),
              "by_reader": {k: round(v, 1) for k, v in rows.items()}}
    Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
