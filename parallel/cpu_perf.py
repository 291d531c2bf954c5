"""Memory-allocator settings for CPU training processes (speed, not correctness).

A training step frees and re-allocates the same activation and gradient buffers every step. glibc
serves every block above its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps it on
free, so each step faults that memory back in, 4 KiB at a time, with the kernel zeroing every page.
With OLMoE's 50k vocabulary the logits alone are over 100 MiB per micro-batch in bf16 (twice that
in fp32 for the loss): `make demo` took ~190,000 minor page faults and ~0.5 s of system time per
step per rank. `tune_malloc` serves all blocks from the heap (M_MMAP_MAX=0) and keeps freed heap
memory in the process (M_TRIM_THRESHOLD at its maximum), so later steps reuse it without faults.
The resident size then stays at its peak, which a training process reaches every step anyway.

The trainer calls it on CPU (gloo) runs. Conversion does not: it hands each layer's memory back to
the OS as it goes (convert/mcore_io.release_freed_memory) to keep its peak at one model.

OLMOE_CPU_MALLOC_TUNING=0 turns it off (to measure it, or on a libc that is not glibc).
"""

from __future__ import annotations

import ctypes
import logging
import os

logger = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_state: dict[str, bool] = {}


def tune_malloc() -> bool:
    """Applies the settings once per process; returns whether glibc accepted them."""
    if "tuned" in _state:
        return _state["tuned"]
    _state["tuned"] = False
    if os.environ.get("OLMOE_CPU_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (AttributeError elsewhere)
    except (OSError, AttributeError):
        logger.info("libc is not glibc: malloc left as it is")
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    accepted = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    if not accepted:
        logger.warning("glibc's mallopt refused M_MMAP_MAX=0 / M_TRIM_THRESHOLD: malloc left untuned")
    _state["tuned"] = accepted
    return accepted
