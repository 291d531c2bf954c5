"""megatron-core's `jit_fuser` (torch.compile) applied on first call instead of at import.

megatron.core.jit sets `jit_fuser = torch.compile`, and some 40 functions of megatron-core are
decorated with it when their modules import (fused_bias_geglu, fused_bias_gelu, the MoE and
cross-entropy fusions, ...). The decoration alone imports torch._dynamo and torch._inductor: about
3.5 s of the 8 s that importing our trainer takes on 2 cores, paid by every process (each rank,
each `olmoe` command), although the CPU path never calls those functions. `install()` (run when
`olmoe_megatron` is imported, before anything imports megatron-core) makes `jit_fuser` a decorator
that calls torch.compile on the function the first time it is called, with the same arguments:
the compiled function, and when compilation happens (at the first call), are unchanged.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys

_MODULE = "megatron.core.jit"
_compile = True


def disable_compile() -> None:
    """Every lazily compiled function runs eagerly from now on (backend patch `no_compile`, CPU)."""
    global _compile
    _compile = False


def compiles() -> bool:
    """Whether lazily compiled functions are compiled at their first call (False: they run eagerly)."""
    return _compile


def lazy_compile(fn=None, **options):
    """torch.compile(fn, **options), compiled at the first call (also usable as @lazy_compile(...));
    after disable_compile(), `fn` itself."""
    if fn is None:
        return functools.partial(lazy_compile, **options)
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal compiled
        if not _compile:
            return fn(*args, **kwargs)
        if compiled is None:
            import torch

            compiled = torch.compile(fn, **options)
        return compiled(*args, **kwargs)

    wrapper.__wrapped_uncompiled__ = fn
    return wrapper


def _make_lazy(module) -> None:
    import torch

    if getattr(module, "jit_fuser", None) is torch.compile:
        module.jit_fuser = lazy_compile
    enable = module.enable_jit_fuser

    @functools.wraps(enable)
    def enable_jit_fuser():
        enable()
        if module.jit_fuser is torch.compile:
            module.jit_fuser = lazy_compile

    module.enable_jit_fuser = enable_jit_fuser


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _make_lazy(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Makes megatron.core.jit's fuser lazy (now, if it is already imported: later decorations only)."""
    if _MODULE in sys.modules:
        _make_lazy(sys.modules[_MODULE])
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
