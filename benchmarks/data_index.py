"""Index build time and peak memory for a synthetic 100B-token dataset, extrapolated to 5T tokens.

The .bin is sparse (no disk blocks, reads as zeros); the .idx is real: random document lengths
(mean --mean-doc-tokens) summing exactly to --tokens. Each sample order's indices (Megatron:
document, sample and shuffle index via GPTDataset's compiled helpers; OLMo: the epoch permutation)
are built for one epoch of 4096-token samples in a fresh child process, timed from DataConfig.build
to the first samples read, with the child's own peak RSS (VmHWM, which includes about 0.4 GB of
imported libraries). 5T figures scale time linearly and RSS as imports + linear growth of the rest (every
index array is linear in tokens or documents).

Usage: python benchmarks/data_index.py --json out.json [--tokens 100e9] [--mean-doc-tokens 1024]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SEQ_LENGTH = 4096
TARGET_TOKENS = 5e12
_CHUNK_DOCUMENTS = 8 << 20


def write_synthetic(prefix: Path, num_tokens: int, mean_doc_tokens: int) -> int:
    """Sparse .bin plus a real .idx; returns the number of documents."""
    import struct

    from olmoe_megatron.data.megatron_format import INDEX_MAGIC

    rng = np.random.default_rng(0)
    num_documents = num_tokens // mean_doc_tokens
    # Lengths mean +- jitter in [1, 2*mean): jitters come in opposite pairs (shuffled), so the sum is
    # exactly num_documents * mean; the last document takes the remainder.
    half = num_documents // 2
    jitter = rng.integers(1 - mean_doc_tokens, mean_doc_tokens, half, dtype=np.int32)
    lengths = np.full(num_documents, mean_doc_tokens, dtype=np.int32)
    lengths[:half] += jitter
    lengths[half:2 * half] -= jitter
    rng.shuffle(lengths)
    lengths[-1] += num_tokens - num_documents * mean_doc_tokens
    with open(f"{prefix}.bin", "wb") as handle:
        handle.truncate(num_tokens * 2)
    with open(f"{prefix}.idx", "wb") as handle:
        handle.write(INDEX_MAGIC + struct.pack("<Q", 1) + struct.pack("<B", 8))
        handle.write(struct.pack("<QQ", num_documents, num_documents + 1))
        handle.write(lengths.tobytes())
        offset = 0
        for start in range(0, num_documents, _CHUNK_DOCUMENTS):
            chunk = lengths[start:start + _CHUNK_DOCUMENTS].astype(np.int64) * 2
            pointers = np.cumsum(chunk) - chunk + offset
            offset = int(pointers[-1] + chunk[-1])
            handle.write(pointers.tobytes())
        for start in range(0, num_documents + 1, _CHUNK_DOCUMENTS):
            handle.write(np.arange(start, min(start + _CHUNK_DOCUMENTS, num_documents + 1), dtype=np.int64).tobytes())
    return num_documents


def build_phase(prefix: str, order: str, cache_dir: str, num_tokens: int) -> None:
    """Child process: build the indices and read a few samples; prints seconds as JSON."""
    # A child of fork+exec inherits its parent's peak RSS in ru_maxrss; reset the kernel's peak first.
    Path("/proc/self/clear_refs").write_text("5")
    import megatron.core.datasets.gpt_dataset  # noqa: F401 - imported before the clock starts

    from olmoe_megatron.data.config import DataConfig

    baseline_rss = peak_rss_bytes()
    start = time.perf_counter()
    dataset = DataConfig(paths=(prefix,), order=order, cache_dir=cache_dir, mask_repeated_ngrams=False).build(
        seq_length=SEQ_LENGTH, num_samples=num_tokens // SEQ_LENGTH - 1, vocab_size=50304)
    for index in (0, len(dataset) // 2, len(dataset) - 1):
        assert dataset[index]["tokens"].shape == (SEQ_LENGTH,)
    print(json.dumps({"seconds": time.perf_counter() - start, "baseline_rss_bytes": baseline_rss,
                      "peak_rss_bytes": peak_rss_bytes()}))


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM) since start or the last clear_refs reset."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def measure(prefix: Path, order: str, cache_dir: Path, num_tokens: int) -> tuple[float, int, int]:
    """(seconds, peak RSS bytes, RSS bytes after imports) of one build in a fresh child process."""
    child = subprocess.Popen([sys.executable, "-W", "ignore", __file__, "--phase", "build", "--prefix", str(prefix),
                              "--order", order, "--cache-dir", str(cache_dir), "--tokens", str(num_tokens),
                              "--json", "-"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    output = child.stdout.read()
    if child.wait() != 0:
        raise RuntimeError(f"{order} build failed with exit code {child.returncode}")
    report = json.loads(output.strip().splitlines()[-1])
    return report["seconds"], report["peak_rss_bytes"], report["baseline_rss_bytes"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--tokens", type=float, default=100e9)
    parser.add_argument("--mean-doc-tokens", type=int, default=1024)
    parser.add_argument("--workdir", default=None, help="directory for the synthetic files (default: a temp dir)")
    parser.add_argument("--phase", default="main", choices=("main", "build"), help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--order", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    num_tokens = int(args.tokens)
    if args.phase == "build":
        build_phase(args.prefix, args.order, args.cache_dir, num_tokens)
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-index-", dir=args.workdir) as tmp:
        prefix = Path(tmp) / "synthetic"
        started = time.perf_counter()
        num_documents = write_synthetic(prefix, num_tokens, args.mean_doc_tokens)
        setup_seconds = time.perf_counter() - started
        results = {order: measure(prefix, order, Path(tmp) / f"cache-{order}", num_tokens)
                   for order in ("megatron", "olmo")}
        idx_bytes = Path(f"{prefix}.idx").stat().st_size
    scale = TARGET_TOKENS / num_tokens
    extrapolated = {order: (s * scale, base + (r - base) * scale) for order, (s, r, base) in results.items()}
    seconds, rss, _ = results["megatron"]
    result = {"tokens": num_tokens, "documents": num_documents, "idx_bytes": idx_bytes, "seconds": round(seconds, 2),
              "peak_rss_bytes": rss, "order": "megatron",
              "olmo_order_seconds": round(results["olmo"][0], 2), "olmo_order_peak_rss_bytes": results["olmo"][1],
              "setup_seconds_untimed": round(setup_seconds, 1),
              "baseline_rss_bytes": results["megatron"][2],
              "extrapolated_5t": {order: {"seconds": round(s, 1), "peak_rss_bytes": int(r)}
                                  for order, (s, r) in extrapolated.items()}}
    print(f"{num_tokens / 1e9:.0f}B tokens, {num_documents / 1e6:.1f}M documents (.idx {idx_bytes / 1e9:.2f} GB)")
    print(f"{'order':<10}{'seconds':>10}{'peak RSS GB':>14}{'5T seconds':>13}{'5T RSS GB':>12}")
    for order, (s, r, _) in results.items():
        s5, r5 = extrapolated[order]
        print(f"{order:<10}{s:>10.1f}{r / 1e9:>14.2f}{s5:>13.0f}{r5 / 1e9:>12.1f}")
    if args.json != "-":
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
