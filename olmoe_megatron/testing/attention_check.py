"""Compares the SDPA core attention with Megatron's DotProductAttention on one rank."""

from __future__ import annotations

import torch


def compare_core_attention(dtype_name: str, *, seq: int = 64, batch: int = 2, heads: int = 4, head_dim: int = 16) -> dict:
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from olmoe_megatron.model.attention import SDPACoreAttention
    from olmoe_megatron.model.megatron_config import to_transformer_config
    from olmoe_megatron.model.precision import PrecisionConfig
    from olmoe_megatron.parallel.context import initialize
    from olmoe_megatron.parallel.layout import ParallelLayout
    from olmoe_megatron.recipes import get_recipe

    model = get_recipe("olmoe_tiny").model.replace(d_model=heads * head_dim, num_heads=heads)
    precision = PrecisionConfig(dtype=dtype_name, spec="local")
    context = initialize(ParallelLayout(), model, seed=0, backend="gloo")
    config = to_transformer_config(model, context.layout, precision=precision, backend="gloo")
    kwargs = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
                  pg_collection=context.groups)
    reference, sdpa = DotProductAttention(**kwargs), SDPACoreAttention(**kwargs)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(seq, batch, heads, head_dim, generator=generator).to(precision.torch_dtype)
               .requires_grad_() for _ in range(3))
    outputs, grads = [], []
    for module in (reference, sdpa):
        out = module(q, k, v, None)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs.append(out.detach().float())
        grads.append(torch.cat([t.grad.float().flatten() for t in (q, k, v)]))
        for t in (q, k, v):
            t.grad = None
    return {
        "shape": list(outputs[1].shape),
        "max_out_diff": float((outputs[0] - outputs[1]).abs().max()),
        "max_out": float(outputs[0].abs().max()),
        "max_grad_diff": float((grads[0] - grads[1]).abs().max()),
        "max_grad": float(grads[0].abs().max()),
    }
