"""Routing traces stream: `olmoe analyze trace`'s peak memory does not grow with the tokens traced.

    python benchmarks/trace_memory.py --ckpt runs/demo/checkpoints/step_0000250 \\
        --tokens 16384 131072 --out benchmarks/results/trace_memory.json

Runs `olmoe analyze trace` once per token count (one process each, fp32) on the demo's held-out
source and records each run's peak resident memory (getrusage of the child), its wall time and
tokens/s, and the store's size on disk. If tracing held the whole trace in memory, the peak would
grow by layers x top-k x 5 bytes per token (ids and probabilities); streamed, it stays at the model
plus one micro-batch plus one chunk of 65,536 tokens. Prints a table and writes JSON with the
commit, the machine and its load. There is no peer: nothing else records OLMoE routing traces.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import provenance  # benchmarks/provenance.py (this folder is on sys.path)


def _store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def trace_once(ckpt: str, tokens: int, work: Path) -> dict:
    out = work / f"trace_{tokens}.zarr"
    command = [sys.executable, "-m", "olmoe_megatron.launcher.cli", "--log-level", "WARNING", "analyze", "trace",
               "--ckpt", ckpt, "--data", "[{name: stdlib, demo_heldout: true}]", "--tokens", str(tokens),
               "--out", str(out), "--precision.dtype=fp32"]
    # A wrapper process per run: its children's ru_maxrss is this trace's peak alone.
    wrapper = [sys.executable, "-c", "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
               "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)", *command]
    start = time.perf_counter()
    done = subprocess.run(wrapper, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak_kib = int(done.stdout.split()[-1])
    size = _store_bytes(out)
    shutil.rmtree(out)
    return {"tokens": tokens, "peak_rss_mib": peak_kib / 1024, "wall_s": wall, "tokens_per_s": tokens / wall,
            "store_mib": size / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="runs/demo/checkpoints/step_0000250")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16_384, 131_072])
    parser.add_argument("--out", default="benchmarks/results/trace_memory.json")
    args = parser.parse_args()
    if not Path(args.ckpt).is_dir():
        print(f"--ckpt {args.ckpt}: no such checkpoint; run `make demo` first", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    commit = provenance.git(provenance.REPOSITORY, "rev-parse", "HEAD").strip() or "unknown"
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for tokens in sorted(args.tokens):
            rows.append(trace_once(args.ckpt, tokens, Path(work)))
            print(f"{tokens:>9,} tokens: peak RSS {rows[-1]['peak_rss_mib']:.0f} MiB, {rows[-1]['wall_s']:.1f} s, "
                  f"store {rows[-1]['store_mib']:.1f} MiB", flush=True)
    print("| tokens | peak RSS MiB | wall s | tokens/s | store MiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']:,} | {r['peak_rss_mib']:.0f} | {r['wall_s']:.1f} | {r['tokens_per_s']:.0f} | "
              f"{r['store_mib']:.2f} |")
    result = {
        "benchmark": "trace_memory", "command": " ".join(["python", "benchmarks/trace_memory.py", *sys.argv[1:]]),
        "checkpoint": args.ckpt, "rows": rows,
        "peak_growth_mib": rows[-1]["peak_rss_mib"] - rows[0]["peak_rss_mib"],
        "commit": commit, "dirty_paths": provenance.dirty_paths(),
        "machine": {**provenance.cpu_description(), "load_average_before": list(load_before),
                    "load_average_after": list(os.getloadavg())},
        "versions": provenance.versions("torch", "megatron-core", "zarr", "numpy"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
