"""Compares PaddedOrStackedSwiGLUExperts (model.expert_impl="grouped" in the local spec) with
Megatron's SequentialMLP (the same weights) on one rank."""

from __future__ import annotations

import torch


def compare_experts(dtype_name: str, tokens_per_expert: list[int], *, hidden: int = 32, ffn: int = 24) -> dict:
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
    from megatron.core.transformer.moe.experts import SequentialMLP

    from olmoe_megatron.model.experts import PaddedOrStackedSwiGLUExperts
    from olmoe_megatron.model.megatron_config import to_transformer_config
    from olmoe_megatron.model.precision import PrecisionConfig
    from olmoe_megatron.parallel.context import initialize
    from olmoe_megatron.parallel.layout import ParallelLayout
    from olmoe_megatron.recipes import get_recipe

    num_experts = len(tokens_per_expert)
    model = get_recipe("olmoe_tiny").model.replace(
        d_model=hidden, num_heads=4, num_experts=num_experts, top_k=min(2, num_experts), expert_ffn_hidden_size=ffn)
    precision = PrecisionConfig(dtype=dtype_name, spec="local")
    context = initialize(ParallelLayout(), model, seed=0, backend="gloo")
    config = to_transformer_config(model, context.layout, precision=precision, backend="gloo")
    submodules = get_moe_module_spec_for_backend(
        backend=LocalSpecProvider(), num_experts=num_experts, moe_grouped_gemm=False).submodules.experts.submodules
    reference = SequentialMLP(num_experts, config, submodules, pg_collection=context.groups)
    grouped = PaddedOrStackedSwiGLUExperts(num_experts, config, submodules, pg_collection=context.groups)
    grouped.load_state_dict(reference.state_dict())

    generator = torch.Generator().manual_seed(0)
    total = sum(tokens_per_expert)
    x = (torch.randn(total, hidden, generator=generator)).to(precision.torch_dtype).requires_grad_()
    probs = torch.rand(total, generator=generator).requires_grad_()
    weight = torch.linspace(-1, 1, total * hidden).view(total, hidden)
    counts = torch.tensor(tokens_per_expert)
    results = []
    for module in (reference, grouped):
        out, bias = module(x, counts, probs)
        (out.float() * weight).sum().backward()
        params = [p.grad.float().flatten() for p in module.parameters()]
        results.append({
            "out": out.detach().float(),
            "grads": torch.cat([x.grad.float().flatten(), probs.grad.float().flatten(), *params]),
            "grad_fn": type(out.grad_fn).__name__,
            "bias": bias,
        })
        x.grad = probs.grad = None
    ref, got = results
    return {
        "grad_fn": got["grad_fn"],
        "bias_is_none": got["bias"] is None,
        "shape": list(got["out"].shape),
        "max_out_diff": float((ref["out"] - got["out"]).abs().max()) if total else 0.0,
        "max_out": float(ref["out"].abs().max()) if total else 0.0,
        "max_grad_diff": float((ref["grads"] - got["grads"]).abs().max()),
        "max_grad": float(ref["grads"].abs().max()),
    }
