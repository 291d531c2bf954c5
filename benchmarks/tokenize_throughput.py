"""Tokenization throughput: `olmoe prep tokenize` against Megatron-LM's tools/preprocess_data.py.

Two inputs, each a .jsonl of about --input-mb, one document per line: "code" (this interpreter's
standard-library source, the demo corpus's text) and "prose" (the machine's man pages, roff source
in a dozen languages, decompressed), each repeated to size. Both tools tokenize the same file with
OLMoE's tokenizer and the same number of worker processes, appending EOS; runs alternate ours /
Megatron-LM --repeats times per input, and the median is reported. MB is 10^6 bytes throughout.

Two rates for ours: end to end (process start to manifest, imports and tokenizer checks included)
and the rate our last progress line reports (bytes over the time from the first shard job's start
to the last shard's end). Megatron-LM is credited with the rate its last progress line reports
(from its pool's start, leaving out its imports and start-up), converted from its MiB/s to MB/s.
`ratio` divides ours end to end by that (conservative); `ratio_reported` compares like with like.

Identity: our shards are concatenated with Megatron-Core's IndexedDatasetBuilder.add_index into
one .bin/.idx, which must equal Megatron-LM's output byte for byte.

Megatron-LM is not vendored: pass a checkout with --megatron-lm DIR (tag core_v0.16.1 matches the
installed megatron-core; it needs the `six` package) and --megatron-lm-commit to record which.
Its `megatron.training` imports a GPU-only kernel module that imports triton; the benchmark gives
that one module an import-only stand-in through a temporary sitecustomize. Without --megatron-lm
the Megatron column is skipped.

Usage: python benchmarks/tokenize_throughput.py --json benchmarks/results/tokenize_throughput.json
           --megatron-lm /work/megatron-lm-0.16.1 [--input-mb 32] [--workers 2] [--repeats 3]
"""

import argparse
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import REPOSITORY, cpu_model, dirty_paths, git, versions

_STUB = '''import sys, types
_m = types.ModuleType("megatron.core.transformer.custom_layers.batch_invariant_kernels")
_m.enable_batch_invariant_mode = lambda *a, **k: None
_m.is_batch_invariant_mode_enabled = lambda *a, **k: False
sys.modules[_m.__name__] = _m
'''
MAN_ROOT = Path("/usr/share/man")


def code_documents(target_bytes: int) -> list[str]:
    from olmoe_megatron.data.corpus import stdlib_source_files

    return [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_source_files(target_bytes)]


def prose_documents(target_bytes: int) -> list[str]:
    """Man pages (every language directory), decompressed, in sorted path order."""
    texts, total = [], 0
    for path in sorted(p for p in MAN_ROOT.rglob("*.gz") if p.is_file()):
        text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        if not text.strip():
            continue
        texts.append(text)
        total += len(text.encode())
        if total >= target_bytes:
            break
    if not texts:
        raise SystemExit(f"no man pages under {MAN_ROOT}: the prose input needs them")
    return texts


def write_input(path: Path, documents: list[str], target_bytes: int) -> int:
    """Writes the documents as jsonl, repeating them until `target_bytes`; returns the bytes written."""
    written = 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < target_bytes:
            for text in documents:
                line = json.dumps({"text": text}) + "\n"
                handle.write(line)
                written += len(line.encode())
                if written >= target_bytes:
                    break
    return written


def run_ours(input_path: Path, out_dir: Path, workers: int, input_bytes: int, encoder: str) -> tuple[float, float]:
    """(end-to-end MB/s, the MB/s of our last progress line)."""
    shard = max(1 << 20, input_bytes // (2 * workers))
    command = [sys.executable, "-m", "olmoe_megatron.launcher.cli", "--log-level", "INFO", "prep", "tokenize",
               str(input_path), "-o", str(out_dir / "ours"), "--workers", str(workers), "--shard-size", str(shard)]
    env = {**os.environ, "OLMOE_TOKENIZER_ENCODER": encoder}
    start = time.perf_counter()
    result = subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    seconds = time.perf_counter() - start
    if f", {'fast' if encoder == 'auto' else 'hf'} encoder" not in result.stderr:
        raise RuntimeError(f"ours did not use the {encoder} encoder:\n{result.stderr[-2000:]}")
    rates = re.findall(r"shards, [0-9.]+ MB at ([0-9.]+) MB/s", result.stderr)
    return input_bytes / 1e6 / seconds, float(rates[-1])


def run_megatron(megatron_lm: Path, input_path: Path, out_dir: Path, workers: int, tokenizer_json: Path) -> float:
    model_dir = out_dir / "hf_tokenizer"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|padding|>"}))
    stub_dir = out_dir / "stub"
    stub_dir.mkdir(exist_ok=True)
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
    return float(rates[-1]) * 1024 * 1024 / 1e6  # it divides by 1024*1024 and calls that MB


def merged_ours(out_dir: Path) -> tuple[bytes, bytes]:
    """Our shards joined by Megatron-Core's own builder: (.bin bytes, .idx bytes)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from olmoe_megatron.data.tokenize_text import shard_prefixes

    merged = out_dir / "ours_merged"
    builder = IndexedDatasetBuilder(f"{merged}.bin", dtype=np.uint16)
    for prefix in shard_prefixes(out_dir / "ours.manifest.json"):
        builder.add_index(prefix)
    builder.finalize(f"{merged}.idx")
    return Path(f"{merged}.bin").read_bytes(), Path(f"{merged}.idx").read_bytes()


def identical(out_dir: Path) -> dict:
    ours_bin, ours_idx = merged_ours(out_dir)
    megatron_bin = (out_dir / "megatron_text_document.bin").read_bytes()
    megatron_idx = (out_dir / "megatron_text_document.idx").read_bytes()
    return {"bin": ours_bin == megatron_bin, "idx": ours_idx == megatron_idx, "bin_bytes": len(ours_bin)}


def clear(out_dir: Path) -> None:
    for path in out_dir.glob("ours*"):
        path.unlink()
    for path in out_dir.glob("megatron_text_document.*"):
        path.unlink()


def megatron_provenance(megatron_lm: Path, commit: str | None) -> dict:
    info = {"path": str(megatron_lm), "commit": commit}
    package = megatron_lm / "megatron" / "core" / "package_info.py"
    if package.is_file():
        fields = dict(re.findall(r"^(MAJOR|MINOR|PATCH|PRE_RELEASE) = \"?([^\"\n]*)\"?$", package.read_text(), re.M))
        info["version"] = ".".join(fields.get(k, "?") for k in ("MAJOR", "MINOR", "PATCH")) + fields.get("PRE_RELEASE", "")
    if (megatron_lm / ".git").exists():
        info["commit"] = git(str(megatron_lm), "rev-parse", "HEAD").strip() or commit
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--megatron-lm", type=Path, default=None)
    parser.add_argument("--megatron-lm-commit", default=None, help="recorded in the JSON (an archive has no .git)")
    parser.add_argument("--input-mb", type=float, default=32)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inputs", default="code,prose")
    parser.add_argument("--encoder", choices=("auto", "hf"), default="auto",
                        help="ours: 'auto' (the fast path; the run fails if it is not taken) or 'hf' (forced)")
    args = parser.parse_args()

    from olmoe_megatron.data.tokenizer import olmoe_tokenizer_path

    tokenizer_json = olmoe_tokenizer_path()
    target = int(args.input_mb * 1e6)
    makers = {"code": code_documents, "prose": prose_documents}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as tmp:
        tmp = Path(tmp)
        for name in args.inputs.split(","):
            input_path = tmp / f"{name}.jsonl"
            input_bytes = write_input(input_path, makers[name](target), target)
            ours, reported, megatron, loads, same = [], [], [], [], None
            for repeat in range(args.repeats):
                clear(tmp)
                loads.append(os.getloadavg()[0])
                end_to_end, own = run_ours(input_path, tmp, args.workers, input_bytes, args.encoder)
                ours.append(end_to_end)
                reported.append(own)
                if args.megatron_lm is not None:
                    megatron.append(run_megatron(args.megatron_lm.resolve(), input_path, tmp, args.workers,
                                                 tokenizer_json))
                    if same is None:
                        same = identical(tmp)
                print(f"{name} run {repeat + 1}: ours {ours[-1]:.2f} MB/s end to end, {reported[-1]:.2f} reported"
                      + (f", Megatron-LM {megatron[-1]:.2f} MB/s" if megatron else ""), flush=True)
            row = {"input": name, "input_bytes": input_bytes, "documents_written": sum(1 for _ in open(input_path)),
                   "ours_mb_per_s": round(statistics.median(ours), 3), "ours_runs": [round(x, 3) for x in ours],
                   "ours_reported_mb_per_s": round(statistics.median(reported), 3),
                   "ours_reported_runs": [round(x, 3) for x in reported],
                   "load_average_1min_before_runs": loads}
            if megatron:
                row.update(megatron_mb_per_s=round(statistics.median(megatron), 3),
                           megatron_runs=[round(x, 3) for x in megatron],
                           ratio=round(statistics.median(ours) / statistics.median(megatron), 3),
                           ratio_reported=round(statistics.median(reported) / statistics.median(megatron), 3),
                           identical_bin=same["bin"], identical_idx=same["idx"], bin_bytes=same["bin_bytes"])
            rows.append(row)
    result = {
        "benchmark": "tokenize_throughput",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": git(REPOSITORY, "rev-parse", "HEAD").strip(),
        "dirty_paths": dirty_paths(),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average_at_end": os.getloadavg()},
        "workers": args.workers,
        "encoder": args.encoder,
        "repeats": args.repeats,
        "versions": versions("tiktoken", "tokenizers", "transformers", "megatron-core"),
        "python": sys.version.split()[0],
        "megatron_lm": None if args.megatron_lm is None else megatron_provenance(args.megatron_lm.resolve(),
                                                                                   args.megatron_lm_commit),
        "results": rows,
    }
    print(f"{'input':<8}{'MB':>7}{'ours e2e':>10}{'ours rep.':>10}{'Megatron':>10}{'ratio':>7}{'rep.':>7}"
          "  identical .bin/.idx   (MB/s)")
    for row in rows:
        print(f"{row['input']:<8}{row['input_bytes'] / 1e6:>7.1f}{row['ours_mb_per_s']:>10.2f}"
              f"{row['ours_reported_mb_per_s']:>10.2f}{row.get('megatron_mb_per_s', float('nan')):>10.2f}"
              f"{row.get('ratio', float('nan')):>7.2f}{row.get('ratio_reported', float('nan')):>7.2f}  "
              f"{row.get('identical_bin')}/{row.get('identical_idx')}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
