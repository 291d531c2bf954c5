"""Runs one OLMoE MoE layer with and without the identity-sort skip of `AlltoAllTokenDispatcher`."""

from __future__ import annotations

import torch


def compare_dispatch_sort_skip(dtype_name: str = "fp32", *, tokens: int = 24, batch: int = 2) -> dict:
    from olmoe_megatron.model.build import build_model_chunks
    from olmoe_megatron.model.moe_layer import AlltoAllTokenDispatcher
    from olmoe_megatron.model.precision import PrecisionConfig
    from olmoe_megatron.parallel.context import initialize
    from olmoe_megatron.parallel.layout import ParallelLayout
    from olmoe_megatron.recipes import get_recipe

    model = get_recipe("olmoe_tiny").model
    precision = PrecisionConfig(dtype=dtype_name, spec="local")
    context = initialize(ParallelLayout(), model, seed=0, backend="gloo")
    mlp = build_model_chunks(model, context, precision=precision)[0].decoder.layers[0].mlp
    dispatcher = mlp.token_dispatcher
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, batch, model.d_model, generator=generator).to(precision.torch_dtype).requires_grad_()
    weight = torch.linspace(-1, 1, x.numel()).view_as(x)
    results = {}
    for skip in (True, False):
        dispatcher.skip_identity_sort = skip
        out, _ = mlp(x)
        (out.float() * weight).sum().backward()
        results[skip] = (out.detach().clone(), x.grad.clone(), [p.grad.clone() for p in mlp.parameters()])
        x.grad = None
        for p in mlp.parameters():
            p.grad = None
    dispatcher.skip_identity_sort = True
    (out_a, gx_a, gp_a), (out_b, gx_b, gp_b) = results[True], results[False]
    return {
        "dispatcher": type(dispatcher).__name__,
        "is_ours": isinstance(dispatcher, AlltoAllTokenDispatcher),
        "sort_is_identity": dispatcher._sort_is_identity(),
        "num_local_experts": dispatcher.num_local_experts,
        "out_equal": bool(torch.equal(out_a, out_b)),
        "input_grad_equal": bool(torch.equal(gx_a, gx_b)),
        "param_grads_equal": all(torch.equal(a, b) for a, b in zip(gp_a, gp_b)),
        "num_param_grads": len(gp_a),
    }
