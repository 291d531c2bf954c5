"""Megatron's MoELayer with one redundant permutation skipped and, in bf16 on CPU, top-k routing
computed once.

Megatron's all-to-all dispatcher receives, after its all-to-all, one chunk of tokens per
(source rank, local expert) and sorts those chunks by local expert ("permutation 2"); after the
experts it undoes the sort. With expert parallel 1 and expert tensor parallel 1 there is one source
rank, the chunks already arrive in expert order, and both sorts are the identity: each is still a
split into `num_local_experts` pieces and a concatenation, forward and backward (about 2% of an
olmoe_small step on 2 CPU cores). `AlltoAllTokenDispatcher` skips them exactly then; every other
layout runs Megatron's code unchanged. In that case on CPU in bf16 it also sums each token's expert
outputs with the C kernel (fp32, one rounding) instead of Megatron's bf16 scatter-add.

Megatron's TopKRouter computes the softmax and the top-k twice per layer, once for routing and once
for the load-balancing loss (`compute_routing_scores_for_aux_loss`), and builds the probabilities
and the routing map by scattering into zero tensors. With OLMoE's router (softmax before top-k, no
groups, scaling, bias, capacity or jitter) both are the same top-k of the same scores:
`OlmoeTopKRouter` computes them once (the mask from the C kernel) and reuses Megatron's gating, z-loss
and load-balancing code, so every value is Megatron's. Gradients reach the logits through one
softmax instead of two, a different order of fp32 sums: so fp32 runs, whose losses are pinned bit
for bit, keep Megatron's router, and bf16 CPU runs take this one.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer, get_default_pg_collection
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from olmoe_megatron.model import cpu_kernels


class AlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """MoEAlltoAllTokenDispatcher without the identity sort by local expert (EP = expert-TP = 1)."""

    skip_identity_sort = True
    """False runs Megatron's sorts regardless (the equivalence test compares both)."""

    def _sort_is_identity(self) -> bool:
        return (
            self.skip_identity_sort
            and self.ep_size == 1
            and self.tp_size == 1
            and not self.drop_and_pad
            and self.shared_experts is None
        )

    def dispatch_postprocess(self, global_input_tokens: torch.Tensor, global_probs: torch.Tensor):
        if not self._sort_is_identity():
            return super().dispatch_postprocess(global_input_tokens, global_probs)
        # The same synchronisation points as Megatron's path (they move the splits to the host).
        self.tokens_per_expert = self._maybe_dtoh_and_synchronize("before_permutation_2", self.tokens_per_expert)
        tokens_per_expert = self._maybe_dtoh_and_synchronize("before_finish", self.tokens_per_expert)
        self.tokens_per_expert = None
        return global_input_tokens, tokens_per_expert, global_probs

    def combine_preprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self._sort_is_identity():
            return super().combine_preprocess(hidden_states)
        return hidden_states

    def combine_postprocess(self, permutated_local_input_tokens: torch.Tensor) -> torch.Tensor:
        # Megatron's unpermute scatter-adds the expert outputs into zeros, in bf16 one add at a time;
        # on CPU the C kernel sums each token's rows in fp32 and rounds once.
        if (self._sort_is_identity() and not self.config.moe_permute_fusion
                and cpu_kernels.applies(permutated_local_input_tokens)):
            output = cpu_kernels.combine_rows(permutated_local_input_tokens, self.reversed_local_input_permutation_mapping,
                                              self.hidden_shape_before_permute[0])
            return output.view(self.hidden_shape)
        return super().combine_postprocess(permutated_local_input_tokens)


def route_once_applies(router, logits: torch.Tensor) -> bool:
    """OLMoE's router in a bf16 run on CPU, with the kernels built."""
    config = router.config
    return (
        config.bf16
        and logits.device.type == "cpu"
        and router.routing_type != "sinkhorn"
        and router.score_function == "softmax"
        and config.moe_router_pre_softmax
        and config.moe_router_num_groups is None
        and config.moe_router_topk_scaling_factor is None
        and router.expert_bias is None
        and getattr(router, "router_replay", None) is None
        and not config.moe_router_fusion
        and config.moe_expert_capacity_factor is None
        and cpu_kernels.available()
    )


def route_once(router: TopKRouter, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TopKRouter.routing for OLMoE's router, the softmax and top-k computed once (see module doc)."""
    seq_length, bsz = logits.shape[:2]
    logits_TE = router.apply_z_loss(logits.view(-1, router.config.num_moe_experts))
    scores_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    with torch.no_grad():
        routing_map_TE = cpu_kernels.topk_mask(scores_TE, router.topk)
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
    """MoELayer whose all-to-all dispatcher is `AlltoAllTokenDispatcher` and whose router is
    `OlmoeTopKRouter`."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        super().__init__(config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection)
        if type(self.token_dispatcher) is MoEAlltoAllTokenDispatcher:
            self.token_dispatcher = AlltoAllTokenDispatcher(
                self.num_local_experts, self.local_expert_indices, config=self.config, pg_collection=pg_collection
            )
            if self.use_shared_expert and self.shared_expert_overlap:
                self.token_dispatcher.set_shared_experts(self.shared_experts)
        if type(self.router) is TopKRouter:
            # The same object (parameters and their initialisation untouched), our routing method.
            self.router.__class__ = OlmoeTopKRouter
