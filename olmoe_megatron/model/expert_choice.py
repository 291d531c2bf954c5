"""Expert-choice routing: each expert takes its top-C tokens of each sequence (model.router_type).

As megablocks' `moe_expert_choice` (Muennighoff/megablocks, branch olmoe, `LearnedRouter.forward`),
which OLMoE's paper ablation ran: the scores are the softmax over experts of the router logits (fp32,
as OLMoE's token-choice router), and each expert takes, within each sequence, the C tokens with its
highest scores, C = floor(capacity_factor * top_k * S / E) (`model.config.expert_capacity`; megablocks
computes `(top_k * sl) // E`, factor 1). A token gets 0..E experts; its weights are its scores at
the chosen entries, not renormalised. Choosing within a sequence (megablocks' topk runs over the
sequence dim of [batch, experts, seq]) makes a sequence's routing independent of the rest of the
micro-batch, so data parallelism, expert parallelism (each EP rank routes its own micro-batch) and
the micro-batch size leave it unchanged.

Under sequence parallelism each TP rank's router sees only its slice of every sequence: the scores
are gathered over the TP group for the choice (forward only, no gradient: the choice is a mask), and
each rank keeps its own rows, exactly the map one process computes. Context parallelism splits
sequences too; the run config refuses it with expert choice.

No load-balancing loss (megablocks' expert-choice forward records none: every expert takes C tokens
by construction); Megatron's z-loss on the logits applies as with token choice. The routing map has a
data-dependent number of entries per rank, which Megatron's all-to-all dispatcher handles when
`moe_expert_capacity_factor` is set (model/megatron_config.py); the allgather dispatcher counts the
map's entries anyway.

Legend: S positions of a sequence (S_local: this rank's), B sequences, E experts, T = S_local * B
tokens of this rank; `_SBE`, `_TE` name the dims of a tensor.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.moe.router import TopKRouter

from olmoe_megatron.model.config import expert_capacity


def choose_tokens(scores_SBE: torch.Tensor, capacity: int) -> torch.Tensor:
    """Boolean [S, B, E]: for each sequence b and expert e, the `capacity` positions with the
    highest scores_SBE[:, b, e] (torch.topk's choice among ties)."""
    mask_SBE = torch.zeros(scores_SBE.shape, dtype=torch.bool, device=scores_SBE.device)
    if capacity > 0:
        chosen_CBE = torch.topk(scores_SBE, capacity, dim=0, sorted=False).indices
        mask_SBE.scatter_(0, chosen_CBE, True)
    return mask_SBE


class ExpertChoiceRouter(TopKRouter):
    """Megatron's TopKRouter (its gating weight, z-loss, hooks and checkpoint keys) whose `routing`
    lets each expert choose its tokens (module doc). Placed by the spec when
    model.router_type='expert_choice'."""

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """probs [T, E] (the fp32 softmax scores at the chosen entries, zero elsewhere) and the
        boolean routing map [T, E], each expert column holding C entries per sequence."""
        if padding_mask is not None:
            raise ValueError(
                "expert-choice routing takes no padding mask (every position of a sequence competes for "
                "the experts, as in megablocks); pass padding_mask=None"
            )
        capacity_factor = self.config.moe_expert_capacity_factor
        assert capacity_factor is not None, "megatron_config sets moe_expert_capacity_factor for expert choice"
        seq_local, bsz = logits.shape[:2]
        logits_TE = self.apply_z_loss(logits.view(-1, self.config.num_moe_experts))
        scores_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
        with torch.no_grad():
            scores_SBE = scores_TE.view(seq_local, bsz, -1)
            gather = self.config.sequence_parallel and self.tp_group.size() > 1
            if gather:
                scores_SBE = gather_from_sequence_parallel_region(scores_SBE, group=self.tp_group)
            capacity = expert_capacity(seq_length=scores_SBE.shape[0], top_k=self.topk,
                                       num_experts=self.config.num_moe_experts, capacity_factor=capacity_factor)
            mask_SBE = choose_tokens(scores_SBE, capacity)
            if gather:
                start = self.tp_group.rank() * seq_local
                mask_SBE = mask_SBE[start:start + seq_local]
            routing_map_TE = mask_SBE.reshape(-1, self.config.num_moe_experts)
        probs_TE = (scores_TE * routing_map_TE).type_as(logits_TE)
        return probs_TE, routing_map_TE
