"""Builds, caches and loads the C kernels (`kernels.c`), and decides whether they apply.

The C source is compiled once per machine with the system C compiler (`cc`, or `$CC`) into
`$OLMOE_KERNEL_CACHE` (default `~/.cache/olmoe_megatron/cpu_kernels`), keyed by a hash of the
source text, the compiler's version and flags, and the CPU's feature flags (the code is built with
`-march=native`). The file is written under a temporary name and renamed, so concurrent ranks
never load a half-written library. The kernels use OpenMP and link torch's own libgomp, so they
follow `torch.set_num_threads`. No torch headers are involved, so a build takes about a second.

Nothing here is required: without a compiler (or with `OLMOE_CPU_KERNELS=0`) `enabled()` is
False and callers use their torch implementations, which compute the same functions.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11", "-fno-math-errno")

_lock = threading.Lock()
_state: dict[str, object] = {}

_P, _I64, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "rmsnorm_fwd_bf16": (_P, _P, _P, _P, _I64, _I64, _F32),
    "rmsnorm_bwd_bf16": (_P, _P, _P, _P, _P, _P, _I64, _I64),
    "ce_max_bf16": (_P, _P, _I64, _I64),
    "ce_sum_exp_bf16": (_P, _P, _P, _P, _P, _I64, _I64, _I64),
    "ce_grad_bf16": (_P, _P, _P, _P, _P, _P, _I64, _I64, _I64),
    "swiglu_probs_fwd_bf16": (_P, _P, _P, _I64, _I64),
    "swiglu_probs_bwd_bf16": (_P, _P, _P, _P, _P, _I64, _I64),
    "softmax_fwd_f32_bf16": (_P, _P, _I64, _I64, _I64, ctypes.c_int),
    "softmax_bwd_bf16": (_P, _P, _P, _P, _I64, _I64),
    "add_bf16_to_f32": (_I64, _P, _P, _P),
    "topk_mask_f32": (_P, _P, _I64, _I64, _I64),
    "pad_rows": (_P, _P, _P, _P, _I64, _I64, ctypes.c_int),
    "bf16_to_f32_bsd": (_P, _P, _I64, _I64, _I64, _I64, _I64, _F32),
    "row_dot_bf16": (_P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _I64),
    "combine_rows_bf16": (_P, _P, _P, _I64, _I64, _I64),
    "rope_bf16": (_P, _P, _P, _P, _I64, _I64, _I64, ctypes.c_int),
    "adamw_bf16_step": (_I64, _P, _P, _P, _P, _P, _P, _F32, _F32, _F32, _F32, _F32, _F32, _F32, _F32),
}


class KernelsUnavailableError(RuntimeError):
    """A kernel was called while the kernels are not built or are switched off."""


def enabled_by_env() -> bool:
    return os.environ.get("OLMOE_CPU_KERNELS", "1") != "0"


def cache_dir() -> Path:
    root = os.environ.get("OLMOE_KERNEL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "olmoe_megatron" / "cpu_kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return os.uname().machine


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, " ".join(CFLAGS), _cpu_flags()]).encode())
    target = cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *CFLAGS, str(SOURCE), "-o", tmp, "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load():
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (cc, gcc or $CC)")
    lib = ctypes.CDLL(str(_build(compiler)))
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = None
    lib.sum_squares_f32.argtypes = (_I64, _P, _P)
    lib.sum_squares_f32.restype = ctypes.c_double
    return lib


def library():
    """The loaded kernel library, or None (no compiler, build failure, or OLMOE_CPU_KERNELS=0)."""
    if not enabled_by_env():
        return None
    with _lock:
        if "lib" not in _state:
            try:
                _state["lib"] = _load()
            except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as exc:
                logger.warning("CPU kernels unavailable, using torch operators instead: %s", exc)
                _state["lib"] = None
    return _state["lib"]


def require_library(kernel: str):
    """The library, for a wrapper about to call `kernel`; raises where the kernels are off."""
    lib = library()
    if lib is None:
        raise KernelsUnavailableError(
            f"CPU kernel {kernel} called, but the CPU kernels are "
            + ("switched off (OLMOE_CPU_KERNELS=0)" if not enabled_by_env() else "not built (see the warning logged above)")
            + "; callers ask olmoe_megatron.ops.cpu.kernels_apply(...) first and take the torch path otherwise"
        )
    return lib


# ----------------------------------------------------------------------------- the one decision
def enabled() -> bool:
    """Whether the kernels can run at all: built on this machine and not switched off by
    OLMOE_CPU_KERNELS=0. The first call builds (or loads the cached build)."""
    return library() is not None


def kernels_apply(*tensors: torch.Tensor, dtype: torch.dtype | None = torch.bfloat16, contiguous: bool = True) -> bool:
    """Whether the CPU kernels take over for these tensors; every call site asks this.

    True when each tensor is on the CPU, of `dtype` (default bf16: fp32 runs keep torch's code bit
    for bit; None: any dtype, for kernels that copy bytes) and contiguous (`contiguous=False` for
    wrappers that take strided views or make their own contiguous copy), and `enabled()`. A GPU
    tensor answers False before anything is built.
    """
    for t in tensors:
        if not t.is_cpu or (dtype is not None and t.dtype != dtype) or (contiguous and not t.is_contiguous()):
            return False
    return enabled()
