"""What crosses into C: the argument checks every wrapper runs first, and the ctypes arguments.

The kernels take raw pointers and sizes, so a tensor of the wrong dtype, device, layout or shape
would be read or written as garbage (or out of bounds) without a word. Every wrapper therefore
checks its tensors here before taking a pointer: metadata only (dtype, device, strides, shapes),
never a pass over the data, so the checks cost microseconds per call.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch


class KernelArgumentError(ValueError):
    """A tensor (or size) that a CPU kernel cannot take; the message names the kernel, the argument,
    what it got and what it needs."""


def fail(kernel: str, name: str, got: str, needs: str) -> KernelArgumentError:
    return KernelArgumentError(
        f"CPU kernel {kernel}: {name} {got}; it needs {needs} "
        "(callers ask olmoe_megatron.ops.cpu.kernels_apply(...) first and take the torch path otherwise)"
    )


def check_tensor(kernel: str, name: str, t, *, dtype: torch.dtype | None, dim: int | None = None,
                 min_dim: int = 0, contiguous: bool = True) -> None:
    """Raises KernelArgumentError unless `t` is a CPU tensor of `dtype` (None: any) with `dim`
    dimensions (or at least `min_dim`), contiguous where `contiguous`."""
    if not isinstance(t, torch.Tensor):
        raise fail(kernel, name, f"is a {type(t).__name__}", "a torch.Tensor")
    if t.device.type != "cpu":
        raise fail(kernel, name, f"is on device {t.device}", "a CPU tensor")
    if dtype is not None and t.dtype != dtype:
        raise fail(kernel, name, f"has dtype {t.dtype}", f"dtype {dtype}")
    if dim is not None and t.dim() != dim:
        raise fail(kernel, name, f"has shape {tuple(t.shape)}", f"{dim} dimensions")
    if t.dim() < min_dim:
        raise fail(kernel, name, f"has shape {tuple(t.shape)}", f"at least {min_dim} dimensions")
    if contiguous and not t.is_contiguous():
        raise fail(kernel, name, f"is not contiguous (shape {tuple(t.shape)}, strides {t.stride()})",
                   "a contiguous tensor")


def check_shape(kernel: str, name: str, t: torch.Tensor, shape: Sequence[int], why: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise fail(kernel, name, f"has shape {tuple(t.shape)}", f"shape {tuple(shape)} ({why})")


def check_integer(kernel: str, name: str, t) -> None:
    """An integer index tensor on CPU (any integer dtype, any layout: wrappers convert to int64)."""
    check_tensor(kernel, name, t, dtype=None, contiguous=False)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise fail(kernel, name, f"has dtype {t.dtype}", "an integer dtype")


def check_list(kernel: str, name: str, tensors: Sequence[torch.Tensor], *, dtype: torch.dtype,
               like: Sequence[torch.Tensor] | None = None, like_name: str = "") -> None:
    """Each tensor of a list: CPU, `dtype`, contiguous, and (with `like`) the shape of like[i]. One
    cheap pass; the detailed check (and message) runs only for a tensor that fails."""
    # `is_cpu` and `dtype is`: about 0.1 us a tensor, where `device.type` alone costs over 1 us.
    if like is None:
        ok = all(isinstance(t, torch.Tensor) and t.dtype is dtype and t.is_cpu and t.is_contiguous() for t in tensors)
    else:
        ok = all(isinstance(t, torch.Tensor) and t.dtype is dtype and t.is_cpu and t.is_contiguous()
                 and t.shape == m.shape for t, m in zip(tensors, like))
    if ok:
        return
    for i, t in enumerate(tensors):
        check_tensor(kernel, f"{name}[{i}]", t, dtype=dtype)
        if like is not None:
            check_shape(kernel, f"{name}[{i}]", t, like[i].shape, f"the shape of {like_name}[{i}]")


def check_lengths(kernel: str, **lists: Sequence) -> None:
    lengths = {name: len(values) for name, values in lists.items()}
    if len(set(lengths.values())) > 1:
        raise fail(kernel, "the lists", f"have lengths {lengths}", "one entry per tensor in each")


def ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def pointers(tensors) -> ctypes.Array:
    """A C array of the tensors' data pointers (NULL for None)."""
    return (ctypes.c_void_p * len(tensors))(*[ptr(t) if t is not None else None for t in tensors])


def int64s(values) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)
