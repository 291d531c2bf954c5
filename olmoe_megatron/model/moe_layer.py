"""Megatron's MoELayer with one redundant permutation skipped.

Megatron's all-to-all dispatcher receives, after its all-to-all, one chunk of tokens per
(source rank, local expert) and sorts those chunks by local expert ("permutation 2"); after the
experts it undoes the sort. With expert parallel 1 and expert tensor parallel 1 there is one source
rank, the chunks already arrive in expert order, and both sorts are the identity: each is still a
split into `num_local_experts` pieces and a concatenation, forward and backward (about 2% of an
olmoe_small step on 2 CPU cores). `AlltoAllTokenDispatcher` skips them exactly then; every other
layout runs Megatron's code unchanged.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer, get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher


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


class OlmoeMoELayer(MoELayer):
    """MoELayer whose all-to-all dispatcher is `AlltoAllTokenDispatcher`."""

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
