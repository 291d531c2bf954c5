"""Megatron's MoELayer with one redundant permutation skipped and, in bf16 on CPU, top-k routing
computed once.

Megatron's all-to-all dispatcher receives, after its all-to-all, one chunk of tokens per
(source rank, local expert) and sorts those chunks by local expert ("permutation 2"); after the
experts it undoes the sort. With expert parallel 1 and expert tensor parallel 1 there is one source
rank, the chunks already arrive in expert order, and both sorts are the identity: each is still a
split into `num_local_experts` pieces and a concatenation, forward and backward (about 2% of an
olmoe_small step on 2 CPU cores). `OlmoeMoELayer` skips them exactly then, around Megatron's own
dispatcher (built once, by Megatron); every other layout runs Megatron's code unchanged. In that
case on CPU in bf16 it also sums each token's expert outputs with the C kernel (fp32, one rounding)
instead of Megatron's bf16 scatter-add.

Megatron's TopKRouter computes the softmax and the top-k twice per layer, once for routing and once
for the load-balancing loss (`compute_routing_scores_for_aux_loss`), and builds the probabilities
and the routing map by scattering into zero tensors. With OLMoE's router (softmax before top-k, no
groups, scaling, bias, capacity or jitter) both are the same top-k of the same scores:
`OlmoeTopKRouter` (placed through the spec's `MoESubmodules.router`) computes them once (the mask
from the C kernel) and reuses Megatron's gating, z-loss and load-balancing code, so every value is
Megatron's. Gradients reach the logits through one
softmax instead of two, a different order of fp32 sums: so fp32 runs, whose losses are pinned bit
for bit, keep Megatron's router, and bf16 CPU runs take this one.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from olmoe_megatron.ops.cpu import combine_rows, kernels_apply, topk_mask


def sort_is_identity(dispatcher) -> bool:
    """Whether the all-to-all dispatcher's sort by local expert is the identity: one source rank
    (expert parallel 1, expert tensor parallel 1), no drop-and-pad, no shared-expert overlap."""
    return (
        dispatcher.ep_size == 1
        and dispatcher.tp_size == 1
        and not dispatcher.drop_and_pad
        and dispatcher.shared_experts is None
    )


def route_once_applies(router, logits: torch.Tensor) -> bool:
    """OLMoE's router in a bf16 run on CPU, with the kernels built."""
    config = router.config
    return (
        config.bf16
        and router.routing_type != "sinkhorn"
        and router.score_function == "softmax"
        and config.moe_router_pre_softmax
        and config.moe_router_num_groups is None
        and config.moe_router_topk_scaling_factor is None
        and router.expert_bias is None
        and getattr(router, "router_replay", None) is None
        and not config.moe_router_fusion
        and config.moe_expert_capacity_factor is None
        and kernels_apply(logits, dtype=None, contiguous=False)  # on CPU, kernels built
    )


def route_once(router: TopKRouter, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TopKRouter.routing for OLMoE's router, the softmax and top-k computed once (see module doc)."""
    seq_length, bsz = logits.shape[:2]
    logits_TE = router.apply_z_loss(logits.view(-1, router.config.num_moe_experts))
    scores_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    with torch.no_grad():
        routing_map_TE = topk_mask(scores_TE, router.topk)
    # Megatron scatters the top-k values into zeros: the same numbers, gradients masked the same way.
    probs_TE = (scores_TE * routing_map_TE).type_as(logits_TE)
    if router.training and torch.is_grad_enabled() and router.is_aux_loss_enabled():
        probs_TE = router._apply_aux_loss(probs_TE, scores_TE, routing_map_TE)
        probs_TE = router._apply_seq_aux_loss(probs_TE, scores_TE, routing_map_TE, seq_length, bsz)
        probs_TE = router._apply_global_aux_loss(probs_TE, scores_TE, routing_map_TE)
    return probs_TE, routing_map_TE


class OlmoeTopKRouter(TopKRouter):
    """TopKRouter whose routing is `route_once` where that applies (the module, its parameters,
    gating and forward hooks are Megatron's)."""

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        if padding_mask is None and route_once_applies(self, logits):
            return route_once(self, logits)
        return super().routing(logits, padding_mask=padding_mask)


class OlmoeMoELayer(MoELayer):
    """Megatron's MoELayer (its router from the spec, its dispatcher as Megatron builds it) that skips
    the all-to-all dispatcher's sort by local expert where that sort is the identity (module doc)."""

    skip_identity_sort = True
    """False runs Megatron's sorts regardless (the equivalence test compares both)."""

    def skips_identity_sort(self) -> bool:
        dispatcher = self.token_dispatcher
        return (
            self.skip_identity_sort
            and type(dispatcher) is MoEAlltoAllTokenDispatcher
            and not self.config.moe_latent_size
            and sort_is_identity(dispatcher)
        )

    def routed_experts_compute(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        if not self.skips_identity_sort():
            return super().routed_experts_compute(hidden_states, probs)
        dispatcher = self.token_dispatcher
        # Megatron's dispatch_postprocess without permutation 2, with its synchronisation points
        # (they move the splits to the host); combine_preprocess is then the identity too.
        dispatcher.tokens_per_expert = dispatcher._maybe_dtoh_and_synchronize(
            "before_permutation_2", dispatcher.tokens_per_expert)
        tokens_per_expert = dispatcher._maybe_dtoh_and_synchronize("before_finish", dispatcher.tokens_per_expert)
        dispatcher.tokens_per_expert = None
        expert_output, mlp_bias = self.experts(hidden_states, tokens_per_expert, probs)
        assert mlp_bias is None, "OLMoE experts have no bias"
        return expert_output, mlp_bias

    def postprocess(self, output: torch.Tensor, shared_expert_output: torch.Tensor | None):
        # Megatron's unpermute scatter-adds the expert outputs into zeros, in bf16 one add at a time;
        # on CPU the C kernel sums each token's rows in fp32 and rounds once.
        if (self.skips_identity_sort() and not self.config.moe_permute_fusion
                and kernels_apply(output)):
            dispatcher = self.token_dispatcher
            output = combine_rows(output, dispatcher.reversed_local_input_permutation_mapping,
                                  dispatcher.hidden_shape_before_permute[0]).view(dispatcher.hidden_shape)
            return output if shared_expert_output is None else output + shared_expert_output
        return super().postprocess(output, shared_expert_output)
