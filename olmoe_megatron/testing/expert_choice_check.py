"""Runs the expert-choice router and MoE layer of a tiny model in one process (tests/model/test_expert_choice.py).

Legend: S positions, B sequences, E experts, H hidden size, T = S * B tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expert_choice_model_dict(*, capacity_factor: float = 0.7) -> dict:
    """olmoe_tiny with expert-choice routing and a vocabulary of 1024 (a quicker step). Factor 0.7
    makes C = floor(0.175 * S) (5 of 32 tokens), so E * C differs from S * top_k: the dispatcher
    cannot assume top_k rows per token."""
    from olmoe_megatron.config.base import config_to_dict
    from olmoe_megatron.recipes import get_recipe

    model = get_recipe("olmoe_tiny").model.replace(
        router_type="expert_choice", router_aux_loss_coeff=0.0, expert_capacity_factor=capacity_factor,
        vocab_size=1024, padded_vocab_size=1024)
    return config_to_dict(model)


def _dense_moe_reference(mlp, x_TH: torch.Tensor, probs_TE: torch.Tensor, map_TE: torch.Tensor) -> torch.Tensor:
    """sum over chosen experts e of probs[t, e] * SwiGLU_e(x_t), every expert on every token."""
    out_TH = torch.zeros_like(x_TH)
    for e, expert in enumerate(mlp.experts.local_experts):
        gate_TF, up_TF = torch.chunk(x_TH @ expert.linear_fc1.weight.t(), 2, dim=-1)
        y_TH = (F.silu(gate_TF) * up_TF) @ expert.linear_fc2.weight.t()
        out_TH = out_TH + (probs_TE[:, e] * map_TE[:, e]).unsqueeze(-1) * y_TH
    return out_TH


def check_router_and_layer(*, seq_length: int = 32, batch: int = 3, capacity_factor: float = 0.7) -> dict:
    """The router on constructed logits and on a real layer's input, and the layer's output and input
    gradient against a dense computation from the expert weights."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, clear_aux_losses_tracker

    from olmoe_megatron.model.build import build_model_chunks
    from olmoe_megatron.model.config import ModelConfig
    from olmoe_megatron.model.expert_choice import ExpertChoiceRouter
    from olmoe_megatron.model.precision import PrecisionConfig
    from olmoe_megatron.parallel.context import initialize
    from olmoe_megatron.parallel.layout import ParallelLayout

    model = ModelConfig.from_dict(expert_choice_model_dict(capacity_factor=capacity_factor))
    precision = PrecisionConfig(dtype="fp32", spec="local")
    context = initialize(ParallelLayout(), model, seed=0, backend="gloo")
    mlp = build_model_chunks(model, context, precision=precision)[0].decoder.layers[0].mlp
    router = mlp.router
    generator = torch.Generator().manual_seed(0)

    # Random logits: per (sequence, expert) exactly C tokens; sequences routed independently.
    logits_SBE = torch.randn(seq_length, batch, model.num_experts, generator=generator)
    probs_TE, map_TE = router.routing(logits_SBE)
    map_SBE = map_TE.view(seq_length, batch, -1)
    alone = [router.routing(logits_SBE[:, b:b + 1].contiguous())[1].view(seq_length, -1) for b in range(batch)]
    scores_TE = torch.softmax(logits_SBE.view(-1, model.num_experts), dim=-1)
    ranks_ok = all(
        bool((logits_SBE.softmax(-1)[map_SBE[:, b, e], b, e].min()
              >= logits_SBE.softmax(-1)[~map_SBE[:, b, e], b, e].max()))
        for b in range(batch) for e in range(model.num_experts)
    )

    # The layer: Megatron's dispatcher with E * C rows per sequence, not S * top_k. The z-loss's
    # backward scale is Megatron's schedule's to set (shape [1]); the tracker is cleared after.
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    mlp.train()
    x_SBH = torch.randn(seq_length, batch, model.d_model, generator=generator).requires_grad_()
    out_SBH, _ = mlp(x_SBH)
    weight_SBH = torch.randn(out_SBH.shape, generator=generator)
    (out_SBH * weight_SBH).sum().backward()
    grad_SBH = x_SBH.grad.clone()
    x_ref = x_SBH.detach().clone().requires_grad_()
    layer_probs_TE, layer_map_TE = router(x_ref)
    ref_TH = _dense_moe_reference(mlp, x_ref.view(-1, model.d_model), layer_probs_TE, layer_map_TE)
    (ref_TH * weight_SBH.view(-1, model.d_model)).sum().backward()
    clear_aux_losses_tracker()
    return {
        "router_class": type(router).__name__,
        "is_expert_choice": isinstance(router, ExpertChoiceRouter),
        "capacity": model.expert_capacity(seq_length),
        "per_sequence_expert_counts": sorted(set(map_SBE.sum(dim=0).flatten().tolist())),
        "experts_per_token": sorted(set(map_TE.sum(dim=1).tolist())),
        "chosen_are_top": ranks_ok,
        "sequences_independent": all(torch.equal(alone[b], map_SBE[:, b]) for b in range(batch)),
        "probs_are_scores_at_map": bool(torch.equal(probs_TE, scores_TE * map_TE)),
        "probs_dtype": str(probs_TE.dtype),
        "rows_routed": int(layer_map_TE.sum()),
        "rows_token_choice": seq_length * batch * model.top_k,
        "layer_max_diff": float((out_SBH.detach().view(-1, model.d_model) - ref_TH.detach()).abs().max()),
        "layer_max": float(ref_TH.detach().abs().max()),
        "grad_max_diff": float((grad_SBH - x_ref.grad).abs().max()),
        "grad_max": float(x_ref.grad.abs().max()),
    }


def known_answer_routing() -> dict:
    """4 tokens, 4 experts, top-1, factor 1: C = 1. Token 0 is each of experts 0-2's best, token 1
    expert 3's; tokens 2 and 3 get no expert."""
    from olmoe_megatron.model.build import build_model_chunks
    from olmoe_megatron.model.config import ModelConfig
    from olmoe_megatron.model.precision import PrecisionConfig
    from olmoe_megatron.parallel.context import initialize
    from olmoe_megatron.parallel.layout import ParallelLayout

    model = ModelConfig.from_dict(expert_choice_model_dict(capacity_factor=1.0)).replace(num_experts=4, top_k=1)
    context = initialize(ParallelLayout(), model, seed=0, backend="gloo")
    router = build_model_chunks(model, context, precision=PrecisionConfig(dtype="fp32", spec="local"))[0] \
        .decoder.layers[0].mlp.router
    logits_SBE = torch.tensor([[2.0, 2.0, 2.0, -5.0], [0.0, 0.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0],
                               [0.0, 0.0, 0.0, 1.0]]).view(4, 1, 4)
    with torch.no_grad():
        probs_TE, map_TE = router.routing(logits_SBE)
    return {"map": map_TE.int().tolist(), "probs": probs_TE.tolist(),
            "scores": torch.softmax(logits_SBE.view(4, 4), dim=-1).tolist()}
