"""megatron-core's torch.compile decorations are applied on first call (olmoe_megatron.lazy_jit)."""

import subprocess
import sys

import torch

from olmoe_megatron.lazy_jit import lazy_compile


def test_importing_the_trainer_imports_neither_dynamo_nor_inductor():
    code = ("import sys, olmoe_megatron.training.trainer, olmoe_megatron.model.build\n"
            "from megatron.core import jit\n"
            "from megatron.core.fusions import fused_bias_geglu, fused_bias_swiglu\n"
            "import olmoe_megatron.lazy_jit as l\n"
            "assert jit.jit_fuser is l.lazy_compile, jit.jit_fuser\n"
            "assert fused_bias_geglu.geglu.__wrapped_uncompiled__.__name__ == 'geglu'\n"
            "jit.disable_jit_fuser(); jit.enable_jit_fuser(); assert jit.jit_fuser is l.lazy_compile\n"
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor.compile_fx') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_function_is_compiled_at_its_first_call_with_the_given_options(monkeypatch):
    from olmoe_megatron import lazy_jit

    monkeypatch.setattr(lazy_jit, "_compile", True)  # as on a GPU: CPU runs apply the no_compile patch
    graphs = []

    def backend(graph, example_inputs):  # a torch.compile backend that records what it compiles
        graphs.append(graph)
        return graph.forward

    def f(x):
        return x * 2 + 1

    lazy = lazy_compile(f, backend=backend)
    assert lazy.__name__ == "f" and lazy.__wrapped_uncompiled__ is f and graphs == []
    x = torch.arange(4.0)
    assert torch.equal(lazy(x), x * 2 + 1) and len(graphs) == 1
    assert torch.equal(lazy(x), x * 2 + 1) and len(graphs) == 1  # compiled once

    @lazy_compile(backend=backend)  # the decorator form, as megatron's @jit_fuser
    def g(x):
        return x - 1

    assert len(graphs) == 1 and torch.equal(g(x), x - 1) and len(graphs) == 2
    lazy_jit.disable_compile()  # the no_compile patch: the function itself, nothing compiled
    assert not lazy_jit.compiles() and torch.equal(g(x + 1), x) and len(graphs) == 2
