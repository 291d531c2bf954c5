"""Load-balancing loss: HF transformers' normalisation versus ours (megablocks', as OLMoE trained).

Notation per layer l over T tokens, E experts, top-k K: `c_le` = top-k assignments to expert e,
`P_le` = mean router probability of e.

- Ours (Megatron's Switch loss per layer, reported as OLMoE's mean over layers):
      LB_ours = w * mean_l [ E/K * sum_e (c_le / T) * P_le ]
- HF (`load_balancing_loss_func`): pools the tokens of all layers, sums over the K top-k slots:
      LB_hf = E * sum_e (mean_l c_le / T) * (mean_l P_le),      then weighted by router_aux_loss_coef.

For one layer LB_hf = K * LB_ours / w. Over several layers HF takes the product of the layer means
and we the mean of the products, so converting one scalar into the other needs the per-layer
statistics (`routing_statistics`): `hf_lb_from_stats` and `olmoe_lb_from_stats` give both.
"""

from __future__ import annotations

import torch


def routing_statistics(router_logits: list[torch.Tensor], *, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(assignment fraction c_le / T, mean probability P_le), each [L, E], from per-layer [T, E] logits."""
    fractions, probs = [], []
    for logits in router_logits:
        p = torch.softmax(logits.double(), dim=-1)
        chosen = torch.topk(p, top_k, dim=-1).indices
        counts = torch.zeros(p.shape[-1], dtype=torch.float64).scatter_add_(
            0, chosen.reshape(-1), torch.ones(chosen.numel(), dtype=torch.float64))
        fractions.append(counts / p.shape[0])
        probs.append(p.mean(0))
    return torch.stack(fractions), torch.stack(probs)


def olmoe_lb_from_stats(fractions: torch.Tensor, probs: torch.Tensor, *, top_k: int, weight: float = 1.0) -> float:
    """Ours: w * mean over layers of E/K * sum_e f_le P_le."""
    num_experts = fractions.shape[-1]
    return float(weight * (num_experts / top_k * (fractions * probs).sum(-1)).mean())


def hf_lb_from_stats(fractions: torch.Tensor, probs: torch.Tensor, *, weight: float = 1.0) -> float:
    """HF: w * E * sum_e mean_l(f_le) * mean_l(P_le)."""
    num_experts = fractions.shape[-1]
    return float(weight * num_experts * (fractions.mean(0) * probs.mean(0)).sum())
