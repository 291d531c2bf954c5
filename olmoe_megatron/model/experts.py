"""SwiGLU experts computed with one grouped GEMM per projection (torch._grouped_mm).

`GroupedSwiGLUExperts` keeps Megatron's SequentialMLP parameters (one MLP per local expert), so
its state dict, dist-checkpoint keys and optimizer state are exactly SequentialMLP's: checkpoints
move freely between the two. Only the forward differs: instead of a Python loop of 3 small GEMMs
per expert it stacks the local experts' weights and runs `torch._grouped_mm`, a CUTLASS grouped
GEMM on Hopper and a batched kernel on CPU (no grouped_gemm package needed).

Legend: T tokens routed to this rank, H hidden size, F expert FFN width on this rank (already
divided by expert-tensor-parallel), E local experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP


def grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


class GroupedSwiGLUExperts(SequentialMLP):
    """Drop-in for SequentialMLP with a grouped-GEMM forward (SwiGLU, no biases)."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        if not grouped_mm_available():
            raise RuntimeError(
                f"model.expert_impl=grouped needs torch._grouped_mm (torch >= 2.8); torch {torch.__version__} "
                "lacks it: set model.expert_impl=sequential"
            )
        if not (config.gated_linear_unit and config.activation_func is F.silu) or config.add_bias_linear:
            raise ValueError("GroupedSwiGLUExperts computes SwiGLU experts without biases only")

    def forward(self, hidden_TH: torch.Tensor, tokens_per_expert: torch.Tensor, probs_T: torch.Tensor):
        config = self.config
        if config.fp8 or config.fp4 or config.moe_apply_probs_on_input:
            return super().forward(hidden_TH, tokens_per_expert, probs_T)
        experts = self.local_experts
        # [E, 2F, H] and [E, H, F]: the nn.Linear layouts; grouped_mm takes their transposes.
        fc1_EFH = torch.stack([e.linear_fc1.weight for e in experts])
        fc2_EHF = torch.stack([e.linear_fc2.weight for e in experts])
        if not torch.is_tensor(tokens_per_expert):
            tokens_per_expert = torch.as_tensor(tokens_per_expert)
        offsets_E = torch.cumsum(tokens_per_expert.to(device=hidden_TH.device), 0).to(torch.int32)
        fc1_out_T2F = torch._grouped_mm(hidden_TH, fc1_EFH.transpose(1, 2), offs=offsets_E)
        gate_TF, up_TF = torch.chunk(fc1_out_T2F, 2, dim=-1)
        act_TF = F.silu(gate_TF) * up_TF
        act_TF = (act_TF * probs_T.unsqueeze(-1)).to(fc1_out_T2F.dtype)
        out_TH = torch._grouped_mm(act_TF, fc2_EHF.transpose(1, 2), offs=offsets_E)
        return out_TH, None
