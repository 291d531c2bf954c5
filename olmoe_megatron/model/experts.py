"""SwiGLU experts on SequentialMLP's parameters, computed by hand: `PaddedOrStackedSwiGLUExperts`.

It is what `model.expert_impl="grouped"` builds in the local spec (Transformer Engine's spec builds
Megatron's TEGroupedMLP instead). It keeps Megatron's SequentialMLP parameters (one MLP per local
expert), so its state dict, dist-checkpoint keys and optimizer state are exactly SequentialMLP's:
checkpoints move freely between the two. Only the computation differs, and it is two different
computations:

- **CUDA: one grouped GEMM over stacked weights.** Every forward stacks the local experts' weights
  into [E, 2F, H] and [E, H, F] (a copy of all local expert weights in every forward) and runs
  `torch._grouped_mm` (a CUTLASS grouped GEMM on Hopper; no grouped_gemm package needed).
- **CPU: one GEMM per expert over padded rows.** `torch._grouped_mm` would decompose into one GEMM
  per expert anyway, and in bf16 each GEMM is a oneDNN kernel JIT-compiled for its exact shape. The
  number of tokens routed to an expert changes every step, so almost every expert GEMM missed
  oneDNN's primitive cache: about 270 kernel compilations per olmoe_small step (0.35 ms each, plus
  page faults for the code buffers), a third of the step. So on CPU, in bf16/fp16, each expert's
  rows are padded to a multiple of `CPU_ROW_ALIGN` (32): the GEMM shapes come from a small set that
  stays cached. Padding rows are zeros: they add nothing to any result, only ~CPU_ROW_ALIGN/2 rows
  of work per expert. fp32 needs no padding. Forward and backward run by hand (`_PaddedSwiGLU`):
  one `torch.mm` per expert written into one output buffer, no weight stacking or concatenation.
  In bf16 with the CPU kernels enabled (`olmoe_megatron.ops.cpu`), SwiGLU and the probability
  scaling are one fused pass each way, the row padding is one copy, and under Megatron DDP the
  weight gradients are added straight into their fp32 main_grad (Megatron's
  gradient-accumulation fusion).

Legend: T tokens routed to this rank, P the padded row count, H hidden size, F expert FFN width on
this rank (already divided by expert-tensor-parallel), E local experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

from olmoe_megatron.ops.cpu import (
    accumulate_into_main_grads,
    kernels_apply,
    pad_rows,
    swiglu_probs_backward,
    swiglu_probs_forward,
    unpad_rows,
)

CPU_ROW_ALIGN = 32
"""Each expert's rows are padded to a multiple of this on CPU in bf16/fp16 (bounded set of GEMM shapes)."""


def cpu_row_align(dtype: torch.dtype) -> int:
    """Row padding for the CPU expert GEMMs: fp32 GEMMs run on MKL/OpenBLAS kernels that are not
    compiled per shape, so padding would only add work there."""
    return 1 if dtype == torch.float32 else CPU_ROW_ALIGN


def grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


def padded_layout(tokens_per_expert: list[int], align: int) -> tuple[list[int], torch.Tensor]:
    """Rows per expert after padding to `align`, and each real row's position in the padded rows."""
    padded = [-(-count // align) * align for count in tokens_per_expert]
    positions = []
    start = 0
    for count, rows in zip(tokens_per_expert, padded):
        positions.append(torch.arange(start, start + count))
        start += rows
    index = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long)
    return padded, index


def _scatter_rows(rows_TX: torch.Tensor, index_T: torch.Tensor, total: int) -> torch.Tensor:
    if total == rows_TX.shape[0]:  # nothing padded: the index is the identity
        return rows_TX.contiguous()
    out = rows_TX.new_zeros((total, *rows_TX.shape[1:]))
    out.index_copy_(0, index_T, rows_TX)
    return out


def _pad(rows_TX: torch.Tensor, index_T: torch.Tensor, padded: list[int], counts: list[int] | None) -> torch.Tensor:
    """Token rows (grouped by expert) into the padded rows; pad rows are zero."""
    if sum(padded) == rows_TX.shape[0]:
        return rows_TX.contiguous()
    if counts is not None and kernels_apply(rows_TX, dtype=None, contiguous=False):
        return pad_rows(rows_TX, counts, padded)  # each row written once
    return _scatter_rows(rows_TX, index_T, sum(padded))


def _unpad(rows_PX: torch.Tensor, index_T: torch.Tensor, padded: list[int], counts: list[int] | None) -> torch.Tensor:
    if rows_PX.shape[0] == index_T.shape[0]:
        return rows_PX
    if counts is not None and kernels_apply(rows_PX, dtype=None, contiguous=False):
        return unpad_rows(rows_PX, counts, padded)
    return rows_PX.index_select(0, index_T)


def _expert_gemms(inputs_PI: torch.Tensor, weights, padded: list[int]) -> torch.Tensor:
    """out[rows of e] = inputs[rows of e] @ W_e^T, written into one [P, O] buffer."""
    out_PO = inputs_PI.new_empty((inputs_PI.shape[0], weights[0].shape[0]))
    for rows, x, out, weight in zip(padded, inputs_PI.split(padded), out_PO.split(padded), weights):
        if rows:
            torch.mm(x, weight.t(), out=out)
    return out_PO


def _expert_gemms_backward(grad_PO: torch.Tensor, inputs_PI: torch.Tensor, weights, padded: list[int]):
    """Gradients of `_expert_gemms`: (grad of inputs [P, I], [grad of W_e for each expert])."""
    grad_PI = torch.empty_like(inputs_PI)
    grad_weights = []
    for rows, grad, x, grad_x, weight in zip(padded, grad_PO.split(padded), inputs_PI.split(padded), grad_PI.split(padded),
                                             weights):
        if rows:
            torch.mm(grad, weight, out=grad_x)
            grad_weights.append(grad.t().mm(x))
        else:
            grad_weights.append(torch.zeros_like(weight))
    return grad_PI, grad_weights


class _PaddedSwiGLU(torch.autograd.Function):
    """y = sum_e [(silu(x W1g_e^T) * (x W1u_e^T)) * p] W2_e^T over each expert's rows, padded."""

    @staticmethod
    def forward(ctx, hidden_TH, probs_T, padded, index_T, counts, *weights):
        num_experts = len(padded)
        hidden_PH = _pad(hidden_TH, index_T, padded, counts)
        probs_P = _pad(probs_T, index_T, padded, counts)
        fc1_out_P2F = _expert_gemms(hidden_PH, weights[:num_experts], padded)
        ctx.fused = kernels_apply(fc1_out_P2F) and kernels_apply(probs_P, dtype=torch.float32)
        if ctx.fused:  # one pass; act is recomputed in backward
            scaled_PF = swiglu_probs_forward(fc1_out_P2F, probs_P)
            act_PF = None
        else:
            gate_PF, up_PF = torch.chunk(fc1_out_P2F, 2, dim=-1)
            act_PF = F.silu(gate_PF) * up_PF  # in the compute dtype, as Megatron's SwiGLU
            scaled_PF = (act_PF * probs_P.unsqueeze(-1)).to(act_PF.dtype)
        out_PH = _expert_gemms(scaled_PF, weights[num_experts:], padded)
        ctx.save_for_backward(hidden_PH, probs_P, fc1_out_P2F, act_PF, scaled_PF, index_T, *weights)
        ctx.padded, ctx.counts = padded, counts
        ctx.probs_dtype = probs_T.dtype
        return _unpad(out_PH, index_T, padded, counts)

    @staticmethod
    def backward(ctx, grad_out_TH):
        hidden_PH, probs_P, fc1_out_P2F, act_PF, scaled_PF, index_T, *weights = ctx.saved_tensors
        padded = ctx.padded
        num_experts = len(padded)
        grad_out_PH = _pad(grad_out_TH.to(hidden_PH.dtype), index_T, padded, ctx.counts)
        grad_scaled_PF, grad_fc2 = _expert_gemms_backward(grad_out_PH, scaled_PF, weights[num_experts:], padded)
        if ctx.fused:
            grad_fc1_out_P2F, grad_probs_P = swiglu_probs_backward(grad_scaled_PF, fc1_out_P2F, probs_P)
        else:
            grad_fc1_out_P2F, grad_probs_P = _swiglu_probs_backward(grad_scaled_PF, fc1_out_P2F, act_PF, probs_P)

        grad_hidden_PH, grad_fc1 = _expert_gemms_backward(grad_fc1_out_P2F, hidden_PH, weights[:num_experts], padded)
        grad_hidden_TH = _unpad(grad_hidden_PH, index_T, padded, ctx.counts)
        grad_probs_T = _unpad(grad_probs_P, index_T, padded, ctx.counts).to(ctx.probs_dtype)
        # Under Megatron DDP in bf16, the weight gradients go straight into the fp32 main_grad
        # buffer; autograd still receives them (DDP's hook then sees grad_added_to_main_grad).
        if ctx.fused:
            accumulate_into_main_grads(weights, [*grad_fc1, *grad_fc2])
        return (grad_hidden_TH, grad_probs_T, None, None, None, *grad_fc1, *grad_fc2)


def _swiglu_probs_backward(grad_scaled_PF, fc1_out_P2F, act_PF, probs_P):
    """Gradients of fc1_out and of the probabilities, for `scaled = (silu(gate) * up) * p`."""
    dtype = fc1_out_P2F.dtype
    # Probability scaling backward in fp32 (as autograd does for `act * probs` with fp32 probs),
    # then SwiGLU backward in the compute dtype (as autograd does for SequentialMLP): these
    # passes are memory-bound, and bf16 halves their traffic.
    grad_scaled32 = grad_scaled_PF.float()
    grad_probs_P = (grad_scaled32 * act_PF).sum(-1)
    grad_act_PF = (grad_scaled32 * probs_P.unsqueeze(-1)).to(dtype)
    gate_PF, up_PF = torch.chunk(fc1_out_P2F, 2, dim=-1)
    sig_PF = torch.sigmoid(gate_PF)
    silu_PF = gate_PF * sig_PF
    grad_silu_PF = torch.addcmul(sig_PF, silu_PF, 1 - sig_PF)  # d silu(g)/dg = s + silu(g) (1 - s)
    grad_fc1_out_P2F = torch.empty_like(fc1_out_P2F)
    half = gate_PF.shape[-1]
    torch.mul(grad_act_PF * up_PF, grad_silu_PF, out=grad_fc1_out_P2F[:, :half])
    torch.mul(grad_act_PF, silu_PF, out=grad_fc1_out_P2F[:, half:])
    return grad_fc1_out_P2F, grad_probs_P


class PaddedOrStackedSwiGLUExperts(SequentialMLP):
    """Drop-in for SequentialMLP (its parameters and checkpoints; SwiGLU, no biases) whose forward
    is written by hand, differently per device (module doc):

    - CPU: one `torch.mm` per expert over the expert's rows padded to a multiple of
      `CPU_ROW_ALIGN` (bf16/fp16; fp32 unpadded), SwiGLU * probabilities fused (`_PaddedSwiGLU`).
    - CUDA: `torch._grouped_mm` over the local experts' weights, stacked in every forward.

    fp8/fp4 and probabilities applied on the input run SequentialMLP's own forward.
    """

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        if not grouped_mm_available():
            raise RuntimeError(
                f"model.expert_impl=grouped needs torch._grouped_mm (torch >= 2.8); torch {torch.__version__} "
                "lacks it: set model.expert_impl=sequential"
            )
        if not (config.gated_linear_unit and config.activation_func is F.silu) or config.add_bias_linear:
            raise ValueError(
                "model.expert_impl=grouped (PaddedOrStackedSwiGLUExperts) computes SwiGLU experts without biases only: "
                "set model.expert_impl=sequential"
            )

    def forward(self, hidden_TH: torch.Tensor, tokens_per_expert: torch.Tensor, probs_T: torch.Tensor):
        config = self.config
        if config.fp8 or config.fp4 or config.moe_apply_probs_on_input:
            return super().forward(hidden_TH, tokens_per_expert, probs_T)
        experts = self.local_experts
        if hidden_TH.device.type == "cpu":
            counts = tokens_per_expert.tolist() if torch.is_tensor(tokens_per_expert) else list(tokens_per_expert)
            counts = [int(c) for c in counts]
            padded, index_T = padded_layout(counts, cpu_row_align(hidden_TH.dtype))
            weights = [e.linear_fc1.weight for e in experts] + [e.linear_fc2.weight for e in experts]
            return _PaddedSwiGLU.apply(hidden_TH, probs_T, padded, index_T, counts, *weights), None
        # CUDA: stack [E, 2F, H] and [E, H, F] (the nn.Linear layouts; a copy of every local expert
        # weight in each forward); grouped_mm takes their transposes.
        fc1_EFH = torch.stack([e.linear_fc1.weight for e in experts])
        fc2_EHF = torch.stack([e.linear_fc2.weight for e in experts])
        if not torch.is_tensor(tokens_per_expert):
            tokens_per_expert = torch.as_tensor(tokens_per_expert)
        if tokens_per_expert.device.type == "cpu":
            # Megatron's dispatcher hands the counts on the host (after its own sync): the E offsets
            # are summed there and copied from pinned memory without blocking the host (a pageable
            # copy, as `.to(device)` was, waits for the stream).
            offsets_E = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32).pin_memory()
            offsets_E = offsets_E.to(hidden_TH.device, non_blocking=True)
        else:
            offsets_E = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
        fc1_out_T2F = torch._grouped_mm(hidden_TH, fc1_EFH.transpose(1, 2), offs=offsets_E)
        gate_TF, up_TF = torch.chunk(fc1_out_T2F, 2, dim=-1)
        act_TF = F.silu(gate_TF) * up_TF
        act_TF = (act_TF * probs_T.unsqueeze(-1)).to(fc1_out_T2F.dtype)
        out_TH = torch._grouped_mm(act_TF, fc2_EHF.transpose(1, 2), offs=offsets_E)
        return out_TH, None
