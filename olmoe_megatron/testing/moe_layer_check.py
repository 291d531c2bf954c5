"""Runs one OLMoE MoE layer with and without the identity-sort skip of `OlmoeMoELayer`."""

from __future__ import annotations

import torch


def compare_dispatch_sort_skip(dtype_name: str = "fp32", *, tokens: int = 24, batch: int = 2) -> dict:
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from olmoe_megatron.model.build import build_model_chunks
    from olmoe_megatron.model.moe_layer import OlmoeMoELayer
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
        mlp.skip_identity_sort = skip
        out, _ = mlp(x)
        (out.float() * weight).sum().backward()
        results[skip] = (out.detach().clone(), x.grad.clone(), [p.grad.clone() for p in mlp.parameters()])
        x.grad = None
        for p in mlp.parameters():
            p.grad = None
    mlp.skip_identity_sort = True
    (out_a, gx_a, gp_a), (out_b, gx_b, gp_b) = results[True], results[False]
    return {
        "dispatcher": type(dispatcher).__name__,
        "layer_is_ours": isinstance(mlp, OlmoeMoELayer),
        "dispatcher_is_megatrons": type(dispatcher) is MoEAlltoAllTokenDispatcher,
        "sort_is_identity": mlp.skips_identity_sort(),
        "num_local_experts": dispatcher.num_local_experts,
        "out_equal": bool(torch.equal(out_a, out_b)),
        "input_grad_equal": bool(torch.equal(gx_a, gx_b)),
        "param_grads_equal": all(torch.equal(a, b) for a, b in zip(gp_a, gp_b)),
        "num_param_grads": len(gp_a),
    }


def compare_route_once(*, tokens: int = 40, batch: int = 2) -> dict:
    """OLMoE's bf16 router through Megatron's TopKRouter.routing and through the layer's router
    (`route_once`): probabilities, routing map, the logged router losses, the gradients of the input
    and the router weight, and the routing map that forward hooks (expert-load metrics) see."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    from olmoe_megatron.model.build import build_model_chunks
    from megatron.core.transformer.moe.router import TopKRouter

    from olmoe_megatron.model.moe_layer import OlmoeTopKRouter, route_once_applies
    from olmoe_megatron.model.precision import PrecisionConfig
    from olmoe_megatron.parallel.context import initialize
    from olmoe_megatron.parallel.layout import ParallelLayout
    from olmoe_megatron.recipes import get_recipe

    model = get_recipe("olmoe_tiny").model
    precision = PrecisionConfig(dtype="bf16", spec="local")
    context = initialize(ParallelLayout(), model, seed=0, backend="gloo")
    router = build_model_chunks(model, context, precision=precision)[0].decoder.layers[0].mlp.router
    router.train()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, batch, model.d_model, generator=generator).bfloat16().requires_grad_()
    weight = torch.rand(tokens * batch, model.num_experts, generator=generator)
    seen = []
    router.register_forward_hook(lambda module, inputs, output: seen.append(output[1].clone()))
    runs = {}
    for name, fn in (("megatron", lambda h: TopKRouter.routing(router, router.gating(h))), ("once", router)):
        clear_aux_losses_tracker()
        probs, routing_map = fn(x)
        (probs * weight).sum().backward()
        losses = {k: v["values"].clone() for k, v in get_moe_layer_wise_logging_tracker().items()}
        runs[name] = (probs.detach(), routing_map, x.grad.clone(), router.weight.grad.clone(), losses)
        x.grad = router.weight.grad = None
    clear_aux_losses_tracker()
    (p_a, m_a, gx_a, gw_a, l_a), (p_b, m_b, gx_b, gw_b, l_b) = runs["megatron"], runs["once"]
    return {
        "router_class": type(router).__name__,
        "applies": route_once_applies(router, x) and isinstance(router, OlmoeTopKRouter),
        "hook_saw_map": len(seen) == 1 and torch.equal(seen[0], m_b),
        "probs_equal": bool(torch.equal(p_a, p_b)),
        "map_equal": bool(torch.equal(m_a, m_b)),
        "loss_names": sorted(l_a),
        "losses_equal": sorted(l_a) == sorted(l_b) and all(torch.equal(l_a[k], l_b[k]) for k in l_a),
        "max_input_grad_diff": float((gx_a.float() - gx_b.float()).abs().max()),
        "max_input_grad": float(gx_a.float().abs().max()),
        "max_weight_grad_diff": float((gw_a.float() - gw_b.float()).abs().max()),
        "max_weight_grad": float(gw_a.float().abs().max()),
    }
