"""Tokenization throughput: `olmoe prep tokenize` against Megatron-LM's tools/preprocess_data.py.

Both tokenize the same .jsonl (standard-library source as documents, repeated to --input-mb) with
OLMoE's tokenizer and the same number of worker processes, appending EOS. Ours is timed end to end
(process start to manifest); Megatron-LM is credited with the MB/s it reports itself (its last
progress line, which leaves out its start-up), so the ratio is conservative.

Megatron-LM is not vendored: pass a checkout with --megatron-lm DIR (tag core_v0.16.1 matches the
installed megatron-core; it needs the `six` package). Its `megatron.training` imports a GPU-only
kernel module that imports triton; the benchmark gives that one module an import-only stand-in
through a temporary sitecustomize. Without --megatron-lm the Megatron column is skipped.

Usage: python benchmarks/tokenize_throughput.py --json out.json [--megatron-lm DIR] [--input-mb 32] [--workers 2]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_STUB = '''import sys, types
_m = types.ModuleType("megatron.core.transformer.custom_layers.batch_invariant_kernels")
_m.enable_batch_invariant_mode = lambda *a, **k: None
_m.is_batch_invariant_mode_enabled = lambda *a, **k: False
sys.modules[_m.__name__] = _m
'''


def make_input(path: Path, target_bytes: int) -> int:
    from olmoe_megatron.data.corpus import stdlib_source_files

    files = stdlib_source_files(target_bytes)
    written = 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < target_bytes:
            for source in files:
                line = json.dumps({"text": source.read_text(encoding="utf-8", errors="replace")}) + "\n"
                handle.write(line)
                written += len(line.encode())
                if written >= target_bytes:
                    break
    return written


def run_ours(input_path: Path, out_dir: Path, workers: int, input_bytes: int) -> float:
    shard = max(1 << 20, input_bytes // (2 * workers))
    command = [sys.executable, "-m", "olmoe_megatron.launcher.cli", "--log-level", "WARNING", "prep", "tokenize",
               str(input_path), "-o", str(out_dir / "ours"), "--workers", str(workers), "--shard-size", str(shard)]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return input_bytes / 1e6 / (time.perf_counter() - start)


def run_megatron(megatron_lm: Path, input_path: Path, out_dir: Path, workers: int, tokenizer_json: Path) -> float:
    model_dir = out_dir / "hf_tokenizer"
    model_dir.mkdir()
    (model_dir / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|padding|>"}))
    stub_dir = out_dir / "stub"
    stub_dir.mkdir()
    (stub_dir / "sitecustomize.py").write_text(_STUB)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stub_dir), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-W", "ignore", str(megatron_lm / "tools" / "preprocess_data.py"), "--input",
               str(input_path), "--output-prefix", str(out_dir / "megatron"), "--tokenizer-type",
               "HuggingFaceTokenizer", "--tokenizer-model", str(model_dir), "--append-eod", "--workers", str(workers),
               "--log-interval", "200"]
    result = subprocess.run(command, check=True, capture_output=True, text=True, env=env, cwd=megatron_lm)
    rates = re.findall(r"([0-9.]+) MB/s", result.stdout + result.stderr)
    if not rates:
        raise RuntimeError(f"no MB/s in Megatron-LM's output:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return float(rates[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--megatron-lm", type=Path, default=None)
    parser.add_argument("--input-mb", type=float, default=32)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    from olmoe_megatron.data.tokenizer import olmoe_tokenizer_path

    tokenizer_json = olmoe_tokenizer_path()
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp:
        tmp = Path(tmp)
        input_bytes = make_input(tmp / "input.jsonl", int(args.input_mb * 1e6))
        ours = run_ours(tmp / "input.jsonl", tmp, args.workers, input_bytes)
        megatron = None
        if args.megatron_lm is not None:
            megatron = run_megatron(args.megatron_lm.resolve(), tmp / "input.jsonl", tmp, args.workers, tokenizer_json)
            ours_bin = b"".join(p.read_bytes() for p in sorted(tmp.glob("ours_*.bin")))
            same = ours_bin == (tmp / "megatron_text_document.bin").read_bytes()
        result = {"input_bytes": input_bytes, "workers": args.workers, "ours_mb_per_s": round(ours, 3),
                  "megatron_mb_per_s": None if megatron is None else round(megatron, 3),
                  "ratio": None if megatron is None else round(ours / megatron, 3),
                  "identical_tokens": None if megatron is None else same}
    print(f"{'tokenizer':<32}{'MB/s':>10}")
    print(f"{'olmoe prep tokenize (end to end)':<32}{ours:>10.2f}")
    if megatron is not None:
        print(f"{'Megatron-LM preprocess_data':<32}{megatron:>10.2f}")
        print(f"ratio {ours / megatron:.2f}x; identical tokens: {result['identical_tokens']}")
    Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
