"""Compares the local spec's core attention with Megatron's DotProductAttention on one rank."""

from __future__ import annotations

import torch


def _graph_has(grad_fn, name: str, depth: int = 8) -> bool:
    if grad_fn is None or depth == 0:
        return False
    if type(grad_fn).__name__ == name:
        return True
    return any(_graph_has(fn, name, depth - 1) for fn, _ in grad_fn.next_functions)


def compare_core_attention(dtype_name: str, *, seq: int = 64, batch: int = 2, heads: int = 4, head_dim: int = 16,
                           mask: str = "causal", scores_max_elements: int | None = None,
                           cpu_kernels: bool = True) -> dict:
    """Output and q/k/v gradients of DispatchingCoreAttention against DotProductAttention.

    `scores_max_elements` overrides attention.CPU_SCORES_MAX_ELEMENTS (0: the SDPA path on CPU);
    `cpu_kernels=False` runs the explicit-scores path on torch operators only (OLMOE_CPU_KERNELS=0).
    """
    import os

    from olmoe_megatron.model import attention

    default_limit = attention.CPU_SCORES_MAX_ELEMENTS
    default_kernels = os.environ.get("OLMOE_CPU_KERNELS")
    if scores_max_elements is not None:
        attention.CPU_SCORES_MAX_ELEMENTS = scores_max_elements
    if not cpu_kernels:
        os.environ["OLMOE_CPU_KERNELS"] = "0"
    try:
        return _compare(attention, dtype_name, seq, batch, heads, head_dim, mask)
    finally:
        attention.CPU_SCORES_MAX_ELEMENTS = default_limit
        if default_kernels is None:
            os.environ.pop("OLMOE_CPU_KERNELS", None)
        else:
            os.environ["OLMOE_CPU_KERNELS"] = default_kernels


def _compare(attention, dtype_name: str, seq: int, batch: int, heads: int, head_dim: int, mask: str) -> dict:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from olmoe_megatron.model.megatron_config import to_transformer_config
    from olmoe_megatron.model.precision import PrecisionConfig
    from olmoe_megatron.parallel.context import initialize
    from olmoe_megatron.parallel.layout import ParallelLayout
    from olmoe_megatron.recipes import get_recipe

    model = get_recipe("olmoe_tiny").model.replace(d_model=heads * head_dim, num_heads=heads)
    precision = PrecisionConfig(dtype=dtype_name, spec="local")
    context = initialize(ParallelLayout(), model, seed=0, backend="gloo")
    config = to_transformer_config(model, context.layout, precision=precision, backend="gloo")
    kwargs = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType[mask], attention_type="self",
                  pg_collection=context.groups)
    reference, ours = DotProductAttention(**kwargs), attention.DispatchingCoreAttention(**kwargs)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(seq, batch, heads, head_dim, generator=generator).to(precision.torch_dtype)
               .requires_grad_() for _ in range(3))
    # Megatron's unfused path takes the causal mask as a tensor (True = masked), or None for no mask.
    reference_mask = torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(1) if mask == "causal" else None
    outputs, grads = [], []
    for module in (reference, ours):
        out = module(q, k, v, reference_mask if module is reference else None)
        if module is ours:
            path = "scores" if _graph_has(out.grad_fn, "_ScoresAttentionBackward") else "other"
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs.append(out.detach().float())
        grads.append(torch.cat([t.grad.float().flatten() for t in (q, k, v)]))
        for t in (q, k, v):
            t.grad = None
    return {
        "path": path,
        "shape": list(outputs[1].shape),
        "max_out_diff": float((outputs[0] - outputs[1]).abs().max()),
        "max_out": float(outputs[0].abs().max()),
        "max_grad_diff": float((grads[0] - grads[1]).abs().max()),
        "max_grad": float(grads[0].abs().max()),
    }
