"""The README's routing analysis: `olmoe analyze` on the demo's checkpoints (run `make demo` first).

    python benchmarks/routing_demo.py [--tokens 16384] [--out benchmarks/results/routing_demo]

Two domains, neither of them training data: `stdlib` (the held-out standard-library modules the
demo evaluates on) and `licenses` (the license texts Debian ships in /usr/share/common-licenses,
English prose, tokenized here with `olmoe prep tokenize`). Every checkpoint in
runs/demo/checkpoints is traced over the same tokens; then router saturation across them, and
co-activation, domain and vocabulary specialisation of the last one. Each analysis's table is
printed and its JSON and PNG land in --out, with a summary JSON (commit, machine, load,
the commands run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import provenance  # benchmarks/provenance.py (this folder is on sys.path)

LICENSES = Path("/usr/share/common-licenses")


def olmoe(*args: str) -> str:
    command = [sys.executable, "-m", "olmoe_megatron.launcher.cli", "--log-level", "WARNING", *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done.stdout


def tokenize_licenses(work: Path) -> str:
    files = sorted(p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink())
    if not files:
        raise SystemExit(f"{LICENSES} holds no license texts (Debian's base-files ships them)")
    jsonl = work / "licenses.jsonl"
    with jsonl.open("w") as handle:
        for path in files:
            handle.write(json.dumps({"text": path.read_text(errors="replace")}) + "\n")
    prefix = work / "licenses"
    olmoe("prep", "tokenize", str(jsonl), "-o", str(prefix), "--workers", "1")
    return f"{prefix}.manifest.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default="runs/demo/checkpoints")
    parser.add_argument("--tokens", type=int, default=16_384, help="tokens per domain")
    parser.add_argument("--out", default="benchmarks/results/routing_demo")
    args = parser.parse_args()
    steps = sorted(p for p in Path(args.checkpoints).glob("step_*") if p.is_dir())
    if len(steps) < 2:
        raise SystemExit(f"{args.checkpoints} holds {len(steps)} checkpoints; run `make demo` (it keeps them all)")
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    load_before = os.getloadavg()
    commands, tables = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        licenses = tokenize_licenses(work)
        data = f"[{{name: stdlib, demo_heldout: true}}, {{name: licenses, paths: [{licenses}]}}]"
        traces = []
        for step in steps:
            trace = work / f"{step.name}.zarr"
            args_ = ["analyze", "trace", "--ckpt", str(step), "--data", data, "--tokens", str(args.tokens),
                     "--out", str(trace)]
            olmoe(*args_)
            commands.append(" ".join(["olmoe", *args_]))
            traces.append(trace)
            print(f"traced {step}", flush=True)
        last = traces[-1]
        for analysis, inputs in (("saturation", traces), ("coactivation", [last]), ("domains", [last]),
                                 ("vocab", [last])):
            args_ = ["analyze", analysis, *map(str, inputs), "--out", str(out / analysis)]
            tables[analysis] = olmoe(*args_)
            commands.append(" ".join(["olmoe", *args_]))
            print(tables[analysis], flush=True)
    # The JSON files name the temporary traces: say where they came from instead.
    for path in out.glob("*.json"):
        result = json.loads(path.read_text())
        result["traces_of"] = [str(s) for s in steps]
        path.write_text(json.dumps(result, indent=1) + "\n")
    summary = {
        "benchmark": "routing_demo", "command": " ".join(["python", "benchmarks/routing_demo.py", *sys.argv[1:]]),
        "checkpoints": [str(s) for s in steps], "tokens_per_domain": args.tokens, "olmoe_commands": commands,
        "commit": provenance.git(provenance.REPOSITORY, "rev-parse", "HEAD").strip() or "unknown",
        "dirty_paths": provenance.dirty_paths(),
        "machine": {**provenance.cpu_description(), "load_average_before": list(load_before),
                    "load_average_after": list(os.getloadavg())},
        "versions": provenance.versions("torch", "megatron-core", "zarr", "numpy"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
