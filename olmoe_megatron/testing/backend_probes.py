"""Runs the backend patches' probes before and after installing them (for tests/parallel/test_backend_patches.py).

`python -m olmoe_megatron.testing.backend_probes [--as cuda=1,te=0,apex=0]` prints one JSON line:
each probe before and after `install()`, and the names installed. `--as` installs the choice of
another machine (the detected megatron-core version is kept), so a test on CPU can show that a GPU
without Transformer Engine gets exactly the no-TE patches and nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def probe_all() -> dict[str, bool]:
    from olmoe_megatron.parallel import backend_patches

    return {name: bool(patch.probe()) for name, patch in backend_patches.PATCHES.items()}


def gloo_all_gather_check() -> dict:
    """On a gloo pool (patches installed): unpatched gloo rejects unequal sizes, the patch gathers them."""
    import torch
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [1 + r for r in range(world)]
    outs = [torch.empty(n) for n in sizes]
    try:
        distributed_c10d.all_gather(outs, torch.full((sizes[rank],), float(rank)))
        raw_fails = False
    except Exception:  # noqa: BLE001
        raw_fails = True
    dist.barrier()
    dist.all_gather(outs, torch.full((sizes[rank],), float(rank)))
    correct = all(torch.equal(o, torch.full((n,), float(r))) for r, (o, n) in enumerate(zip(outs, sizes)))
    return {"unpatched_fails": raw_fails, "patched_correct": correct}


def _environment(text: str | None):
    from olmoe_megatron.parallel.backend_patches import Environment

    detected = Environment.detect()
    if not text:
        return detected
    names = {"cuda": "cuda", "te": "transformer_engine", "apex": "apex"}
    values = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        values[names[key.strip()]] = value.strip() in ("1", "true", "yes")
    return dataclasses.replace(detected, **values)


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser()
    parser.add_argument("--as", dest="as_env", default=None, help="cuda=0|1,te=0|1,apex=0|1")
    args = parser.parse_args()
    from olmoe_megatron.parallel import backend_patches

    before = probe_all()
    backend_patches.install(environment=_environment(args.as_env))
    after = probe_all()
    print(json.dumps({"before": before, "after": after, "installed": backend_patches.installed()}))


if __name__ == "__main__":
    sys.exit(main())
