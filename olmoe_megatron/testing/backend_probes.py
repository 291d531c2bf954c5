"""Runs the CPU backend's probes before and after installing it (for tests/parallel/test_cpu_backend.py)."""

from __future__ import annotations

import json
import sys


def probe_all() -> dict[str, bool]:
    from olmoe_megatron.parallel import cpu_backend

    return {name: bool(patch.probe()) for name, patch in cpu_backend.PATCHES.items()}


def gloo_all_gather_check() -> dict:
    """On a gloo pool (backend installed): unpatched gloo rejects unequal sizes, the patch gathers them."""
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


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    from olmoe_megatron.parallel import cpu_backend

    before = probe_all()
    cpu_backend.install(force=True)
    after = probe_all()
    print(json.dumps({"before": before, "after": after, "installed": cpu_backend.installed()}))


if __name__ == "__main__":
    sys.exit(main())
