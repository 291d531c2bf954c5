"""Peak memory and time of `olmoe convert` on an olmoe_1b_7b-shaped checkpoint of random bf16 weights.

The full model (16 layers, 6.92B parameters, 13.8 GB in bf16) needs ~42 GB of disk for the HF
source, our checkpoint and the HF export, and minutes of random-number generation on 2 cores;
by default this measures full-width layers at two depths (--layers 2,4) and extrapolates linearly
to 16 layers (the per-layer slope of the two runs). Each conversion runs in a fresh child process
that reports its own peak RSS (VmHWM) and its RSS after imports (the baseline), so the numbers are
the converter's alone.

Expected shape: both directions hold about one layer plus the embeddings (slopes about zero):
hf-to-mcore writes the dist checkpoint layer by layer (olmoe_megatron/convert/dist_writer.py; it
held the whole model plus the writer's clones, 19.5 GiB for 16 layers, before), mcore-to-hf writes
one safetensors shard per layer. The target is at most half the model plus one layer.

The JSON records the commit (and the tracked files that differ from it), the machine (CPU, cores,
memory, load average before and after) and the package versions beside the numbers.

Usage: python benchmarks/convert_memory.py --json out.json [--layers 2,4] [--workdir /tmp/convert_bench]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import provenance  # benchmarks/provenance.py (this folder is on sys.path)

FULL_LAYERS = 16


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _memory_total_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def _code() -> dict:
    """The commit and the tracked files that differ from it, taken when the run starts."""
    return {"commit": provenance.git(provenance.REPOSITORY, "rev-parse", "HEAD").strip() or "unknown",
            "dirty_paths": provenance.dirty_paths()}


def _provenance(code: dict, load_before: tuple[float, ...]) -> dict:
    """The code (at the start), the machine and the versions this run measured."""
    return {
        **code,
        "machine": {**provenance.cpu_description(), "memory_total_bytes": _memory_total_bytes(),
                    "load_average_before": list(load_before), "load_average_after": list(os.getloadavg())},
        "versions": provenance.versions("torch", "megatron-core", "safetensors", "transformers", "numpy"),
    }


def write_random_hf(directory: Path, num_layers: int) -> int:
    """An HF directory of olmoe_1b_7b's width with `num_layers` layers, one shard per layer; returns params."""
    import torch
    from safetensors.torch import save_file

    from olmoe_megatron.convert.safetensors_io import HFShardWriter
    from olmoe_megatron.model import hf_mapping
    from olmoe_megatron.recipes import get_recipe

    model = get_recipe("olmoe_1b_7b").model.replace(num_layers=num_layers)
    directory.mkdir(parents=True)
    writer = HFShardWriter(directory, num_shards=num_layers + 1)
    generator = torch.Generator().manual_seed(0)
    params = 0

    def random_bf16(shapes: dict) -> dict:
        nonlocal params
        out = {}
        for key, shape in shapes.items():
            out[key] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            params += out[key].numel()
        return out

    writer.write(random_bf16(hf_mapping.hf_non_layer_shapes(model)))
    for i in range(num_layers):
        writer.write(random_bf16(hf_mapping.hf_layer_shapes(model, i)))
    writer.finish()
    config = hf_mapping.hf_config_dict(model)
    config["torch_dtype"] = "bfloat16"
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    assert params == model.num_params(), (params, model.num_params())
    del save_file
    return params


def child(direction: str, source: str, target: str) -> None:
    """Runs one conversion in this process and prints its numbers as JSON."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from olmoe_megatron.convert import hf_to_mcore, mcore_to_hf
    from olmoe_megatron.parallel.context import init_distributed

    init_distributed(backend="gloo")
    baseline = _rss_kib("VmRSS") * 1024
    start = time.perf_counter()
    (hf_to_mcore if direction == "hf-to-mcore" else mcore_to_hf)(source, target)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": _rss_kib("VmHWM") * 1024, "baseline_rss_bytes": baseline}))


def run_child(direction: str, source: Path, target: Path) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", direction, str(source), str(target)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{direction} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", default="2,4", help="layer counts to measure (two or more for the slope)")
    parser.add_argument("--workdir", default="/tmp/convert_bench")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--child", nargs=3, metavar=("DIRECTION", "SOURCE", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    from olmoe_megatron.recipes import get_recipe

    load_before = os.getloadavg()
    code = _code()
    full = get_recipe("olmoe_1b_7b").model
    work = Path(args.workdir)
    rows = []
    for num_layers in [int(x) for x in args.layers.split(",")]:
        root = work / f"layers{num_layers}"
        shutil.rmtree(root, ignore_errors=True)
        start = time.perf_counter()
        params = write_random_hf(root / "hf", num_layers)
        print(f"wrote {num_layers}-layer HF checkpoint ({params / 1e9:.2f}B params) in {time.perf_counter() - start:.0f} s", flush=True)
        for direction, source, target in (("hf-to-mcore", root / "hf", root / "ckpt"), ("mcore-to-hf", root / "ckpt", root / "hf_back")):
            result = run_child(direction, source, target)
            rows.append({"direction": direction, "layers": num_layers, "params": params,
                         "bytes": _du(source if direction == "hf-to-mcore" else target), **result})
            print(f"  {direction}: {result['seconds']:.1f} s, peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    extrapolated = []
    for direction in ("hf-to-mcore", "mcore-to-hf"):
        mine = sorted((r for r in rows if r["direction"] == direction), key=lambda r: r["layers"])
        lo, hi = mine[0], mine[-1]
        span = hi["layers"] - lo["layers"]

        def at_full(key: str) -> float:
            slope = (hi[key] - lo[key]) / span if span else 0.0
            return hi[key] + slope * (FULL_LAYERS - hi["layers"])

        layer_bytes = (hi["params"] - lo["params"]) * 2 / span if span else 0.0
        extrapolated.append({"direction": direction, "layers": FULL_LAYERS, "params": full.num_params(),
                             "bytes": 2 * full.num_params(), "seconds": at_full("seconds"),
                             "target_peak_bytes": full.num_params() + layer_bytes,  # half the bf16 model + a layer
                             "peak_rss_bytes": at_full("peak_rss_bytes"), "baseline_rss_bytes": hi["baseline_rss_bytes"],
                             "extrapolated_from_layers": [lo["layers"], hi["layers"]]})

    print(f"\n{'direction':<12} {'layers':>6} {'params':>8} {'bytes':>9} {'seconds':>8} {'peak RSS':>9} {'baseline':>9}")
    for r in rows + extrapolated:
        mark = " (extrapolated)" if "extrapolated_from_layers" in r else ""
        print(f"{r['direction']:<12} {r['layers']:>6} {r['params'] / 1e9:>7.2f}B {r['bytes'] / 1e9:>8.2f}G "
              f"{r['seconds']:>8.1f} {r['peak_rss_bytes'] / 2**30:>8.2f}Gi {r['baseline_rss_bytes'] / 2**30:>8.2f}Gi{mark}")
    if args.json:
        record = {"measured": rows, "extrapolated_16_layers": extrapolated, **_provenance(code, load_before)}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
