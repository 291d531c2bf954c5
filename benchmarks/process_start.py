"""What a process pays before it trains: importing the trainer, and idle process groups.

1. Import time of `olmoe_megatron.training.trainer` in a fresh interpreter, with megatron-core's
   `jit_fuser` made lazy (olmoe_megatron.lazy_jit, the default) and with megatron's own
   torch.compile decoration at import (the lazy finder removed before anything imports
   megatron-core), alternating, --repeats times each.
2. Idle CPU of a process that initialized the layout --inits times (a test pool, a converter
   called repeatedly): threads and CPU seconds per second asleep, with the previous layout's process
   groups destroyed (parallel.context.destroy_model_parallel_groups, the default) and with
   megatron's destroy_model_parallel alone, alternating.

Usage: python benchmarks/process_start.py --json benchmarks/results/process_start.json [--repeats 3] [--inits 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import REPOSITORY, cpu_description, dirty_paths, git, versions  # noqa: E402

_IMPORT = """
import sys, time
if {eager}:
    import olmoe_megatron.lazy_jit as lazy
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, lazy._Finder)]
start = time.perf_counter()
import olmoe_megatron.training.trainer
print(time.perf_counter() - start, "torch._dynamo" in sys.modules)
"""

_IDLE = """
import os, resource, time
from olmoe_megatron.parallel import context
from olmoe_megatron.parallel.layout import ParallelLayout
from olmoe_megatron.recipes import get_recipe
if {forget}:
    from megatron.core import parallel_state
    context.destroy_model_parallel_groups = parallel_state.destroy_model_parallel
model = get_recipe("olmoe_tiny").model
for _ in range({inits}):
    context.initialize(ParallelLayout(), model, seed=1, backend="gloo")
before = resource.getrusage(resource.RUSAGE_SELF)
time.sleep(5.0)
after = resource.getrusage(resource.RUSAGE_SELF)
cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
print(len(os.listdir("/proc/self/task")), cpu / 5.0)
"""


def _run(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPOSITORY)
    return out.stdout.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inits", type=int, default=20)
    args = parser.parse_args()
    load_before = os.getloadavg()
    imports = {"lazy": [], "eager": []}
    dynamo = {}
    idle = {"destroyed": [], "forgotten": []}
    for _ in range(args.repeats):
        for name in ("lazy", "eager"):
            seconds, imported = _run(_IMPORT.format(eager=name == "eager"))
            imports[name].append(float(seconds))
            dynamo[name] = imported == "True"
        for name in ("destroyed", "forgotten"):
            threads, cpu = _run(_IDLE.format(forget=name == "forgotten", inits=args.inits))
            idle[name].append({"threads": int(threads), "idle_cpu_fraction": float(cpu)})
    rows = []
    print(f"{'measure':44} {'median':>8}  runs")
    for name, values in imports.items():
        rows.append({"measure": f"import trainer, jit_fuser {name}", "seconds": statistics.median(values),
                     "runs": values, "imports_torch_dynamo": dynamo[name]})
        print(f"{'import trainer (s), jit_fuser ' + name:44} {statistics.median(values):8.2f}  "
              f"{', '.join(f'{v:.2f}' for v in values)}  (torch._dynamo imported: {dynamo[name]})")
    for name, runs in idle.items():
        cpu = statistics.median(r["idle_cpu_fraction"] for r in runs)
        threads = statistics.median(r["threads"] for r in runs)
        rows.append({"measure": f"idle after {args.inits} inits, groups {name}", "threads": threads,
                     "idle_cpu_fraction": cpu, "runs": runs})
        print(f"{f'idle after {args.inits} inits, groups {name}':44} {cpu:8.3f}  cores busy, {threads:.0f} threads")
    result = {
        "benchmark": "process_start", "rows": rows, "repeats": args.repeats, "inits": args.inits,
        "commit": git(REPOSITORY, "rev-parse", "HEAD").strip(), "dirty_paths": dirty_paths(),
        "machine": {**cpu_description(), "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "versions": versions("torch", "megatron-core"), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump(result, handle, indent=1)
        handle.write("\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
