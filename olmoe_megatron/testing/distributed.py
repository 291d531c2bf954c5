"""Run functions on a pool of gloo worker processes that lives across many tests.

Starting ranks and importing torch + megatron costs 12 s (4 ranks) to 21 s (8 ranks) on 2 cores,
while a layout inside a live process group costs about a second. `DistributedPool` starts the
ranks once (spawn, a free port, one gloo process group) and then runs any importable function on
every rank, returning each rank's result; a failure on any rank raises with that rank's traceback
and the pool is closed (the next `get_pool` starts a fresh one). Worker output is prefixed with
the rank.
"""

from __future__ import annotations

import atexit
import importlib
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from typing import Any, Callable

from olmoe_megatron.parallel.context import free_port


class _RankPrefixed:
    """A text stream that prefixes each line with the rank."""

    def __init__(self, stream, rank: int):
        self._stream = stream
        self._prefix = f"[rank{rank}] "
        self._at_line_start = True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            if self._at_line_start:
                out.append(self._prefix)
            out.append(piece)
            self._at_line_start = piece.endswith("\n")
        self._stream.write("".join(out))
        return len(text)

    def flush(self):
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _drop_model_parallel_groups() -> None:
    """Between tasks a rank keeps only the default group: every gloo group keeps a thread waking
    every 10 ms, and pools of 1, 2, 4 and 8 ranks stay alive across the suite on 2 cores. Every task
    builds its own layout (parallel.context.initialize), so nothing is lost."""
    if "megatron.core.parallel_state" in sys.modules:
        from olmoe_megatron.parallel.context import destroy_model_parallel_groups

        destroy_model_parallel_groups()


def _worker(rank: int, world_size: int, port: int, tasks, results, env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    sys.stdout = _RankPrefixed(sys.stdout, rank)
    sys.stderr = _RankPrefixed(sys.stderr, rank)
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    from olmoe_megatron.parallel.context import init_distributed

    init_distributed(backend="gloo", timeout_minutes=float(env.get("OLMOE_TEST_COLLECTIVE_TIMEOUT_MIN", "3")))
    while True:
        task = tasks.get()
        if task is None:
            break
        module_name, func_name, args, kwargs = task
        try:
            fn = getattr(importlib.import_module(module_name), func_name)
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - report everything to the parent
            results.put((rank, False, traceback.format_exc()))
        _drop_model_parallel_groups()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class DistributedError(RuntimeError):
    """A function failed (or timed out) on at least one rank."""


class DistributedPool:
    """`world_size` gloo ranks waiting for functions to run."""

    def __init__(self, world_size: int, *, timeout_s: float = 600.0, env: dict[str, str] | None = None):
        self.world_size = world_size
        self.timeout_s = timeout_s
        context = mp.get_context("spawn")
        self._tasks = [context.Queue() for _ in range(world_size)]
        self._results = context.Queue()
        worker_env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
        port = free_port()
        self._procs = [
            context.Process(
                target=_worker, args=(rank, world_size, port, self._tasks[rank], self._results, worker_env)
            )
            for rank in range(world_size)
        ]
        for proc in self._procs:
            proc.start()
        self.closed = False

    def run(self, fn: Callable, *args: Any, **kwargs: Any) -> list[Any]:
        """Runs `fn(*args, **kwargs)` on every rank; returns the results ordered by rank."""
        if self.closed:
            raise DistributedError("the pool is closed")
        task = (fn.__module__, fn.__qualname__, args, kwargs)
        for q in self._tasks:
            q.put(task)
        results: dict[int, Any] = {}
        failures: dict[int, str] = {}
        deadline = time.monotonic() + self.timeout_s
        while len(results) + len(failures) < self.world_size:
            try:
                rank, ok, value = self._results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.close()
                    pending = sorted(set(range(self.world_size)) - results.keys() - failures.keys())
                    raise DistributedError(
                        f"{fn.__qualname__} did not finish on ranks {pending}: "
                        + (f"ranks {dead} died" if dead else f"timed out after {self.timeout_s:.0f} s")
                    ) from None
                continue
            (results if ok else failures)[rank] = value
        if failures:
            self.close()
            first = min(failures)
            raise DistributedError(
                f"{fn.__qualname__} failed on ranks {sorted(failures)}; rank {first}:\n{failures[first]}"
            )
        return [results[r] for r in range(self.world_size)]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for q in self._tasks:
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)


_POOLS: dict[int, DistributedPool] = {}


def standalone_env(**overrides: str) -> dict[str, str]:
    """This process's environment without torch.distributed's rendezvous variables, plus `overrides`:
    for a child process that must start its own world (a test process that converted a checkpoint
    holds a world of one on MASTER_PORT, which a child inheriting it would try to bind again)."""
    from olmoe_megatron.parallel.context import without_rendezvous

    env = without_rendezvous(dict(os.environ))
    env.update(overrides)
    return env


def get_pool(world_size: int) -> DistributedPool:
    """The live pool of `world_size` ranks, started on first use (and again after a failure)."""
    pool = _POOLS.get(world_size)
    if pool is None or pool.closed:
        pool = _POOLS[world_size] = DistributedPool(world_size)
    return pool


def run_on_one_rank(fn: Callable, cases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`fn(**kwargs)` for each named case on the one-rank pool, which is closed after: name -> result."""
    pool = get_pool(1)
    try:
        return {name: pool.run(fn, **kwargs)[0] for name, kwargs in cases.items()}
    finally:
        pool.close()


def close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


atexit.register(close_pools)
