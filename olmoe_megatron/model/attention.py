"""Core attention for the local spec: `DispatchingCoreAttention`, three implementations behind
Megatron's DotProductAttention interface, chosen per call.

1. **Megatron's `DotProductAttention`** (the parent class's forward): fp32 runs, and every case the
   other two do not compute identically (an attention mask or bias tensor, packed sequences,
   dropout, a softmax offset, a sliding window, query-key layer scaling, masks other than causal
   or none). fp32 is the reference precision (golden losses, layout equivalence tests) and must
   stay bit-identical; SDPA's tiled reductions differ from Megatron's in the last bits.
2. **Explicit-scores CPU attention** (`_ScoresAttention`): bf16/fp16 on CPU when the
   [b*heads, s, s] scores of one layer have at most `CPU_SCORES_MAX_ELEMENTS` entries (and no
   GQA). SDPA's CPU flash kernel runs its tiles as small GEMMs at ~60-100 GFLOP/s on the
   olmoe_small benchmark (seq 256, head dim 64, 2 cores), while one batched matmul over all heads
   runs at 190 (fp32) to 400 (bf16) GFLOP/s. So the scores q k^T are one fp32 batched matmul (bf16
   inputs, fp32 result: the products are exact and the sum is fp32, as in the flash kernel), the
   causal mask is added in the same call, the softmax is fp32, and probabilities go to the compute
   dtype for p v, as the flash kernel does. Backward (the flash-attention recurrence:
   dS = P * (dP - rowsum(dO * O))) keeps dP in fp32 and runs the dV, dQ, dK matmuls in the compute
   dtype. Forward + backward per layer: 5.1 ms against SDPA's 7.7 ms. In bf16 with the CPU kernels
   enabled (`olmoe_megatron.ops.cpu`), mask + softmax + cast is one pass forward and
   P * (dP - row) + cast one pass backward, the fp32 operands are widened from the strided bf16
   views in one pass each, and the row term is one pass over dO and O.
3. **torch's `F.scaled_dot_product_attention`**: bf16/fp16 on GPU, and on CPU for long sequences
   (or GQA): the flash / memory-efficient kernels, fp32 accumulation, no s x s buffers.

Megatron's local `DotProductAttention` materialises the [b*heads, s, s] scores with baddbmm in the
compute dtype (bf16 scores: a rounding step of 2^-8 relative before the softmax), masks and
softmaxes them in separate kernels and keeps the probabilities for backward; 2 and 3 do not.

Legend: s sequence, b micro-batch, n heads on this rank, g query groups on this rank, d head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from olmoe_megatron.ops.cpu import (
    attention_softmax_backward,
    attention_softmax_forward,
    kernels_apply,
    row_dot_bsd,
    widen_bsd,
)

CPU_SCORES_MAX_ELEMENTS = 2 ** 24
"""The explicit-scores CPU attention runs when b * heads * s_q * s_k is at most this (per layer: the
saved probabilities take 2 bytes an entry, the transient fp32 scores 4): 16M entries is 32 MiB kept
for backward per layer. Longer sequences take SDPA's flash kernel, which keeps no s x s buffer."""

_CAUSAL_BIAS: dict[int, torch.Tensor] = {}


def _causal_bias(s: int) -> torch.Tensor:
    """[s, s] fp32: 0 on and below the diagonal, -inf above (a query sees itself and earlier keys)."""
    bias = _CAUSAL_BIAS.get(s)
    if bias is None:
        bias = torch.zeros(s, s).masked_fill_(torch.ones(s, s, dtype=torch.bool).triu_(1), float("-inf"))
        _CAUSAL_BIAS[s] = bias
    return bias


def _widen(x_Bsd: torch.Tensor, fused: bool, scale: float = 1.0) -> torch.Tensor:
    """fp32 copy of a [B, s, d] operand times `scale`: one C pass from the strided bf16 view where
    the kernels apply, else torch's cast (and multiply)."""
    widened = widen_bsd(x_Bsd, scale) if fused else None
    if widened is not None:
        return widened
    return x_Bsd.float().mul_(scale) if scale != 1.0 else x_Bsd.float()


class _ScoresAttention(torch.autograd.Function):
    """softmax(scale q k^T + mask) v over B = b * heads independent [s, d] problems (CPU)."""

    @staticmethod
    def forward(ctx, q_Bsd, k_Bsd, v_Bsd, scale: float, causal: bool):
        ctx.fused = kernels_apply(q_Bsd, contiguous=False)  # strided views: the wrappers read them
        q32_Bsd = _widen(q_Bsd, ctx.fused, scale)
        k32_Bds = _widen(k_Bsd, ctx.fused).transpose(1, 2)
        if ctx.fused:  # mask, softmax and the cast to bf16 in one pass
            probs_Bss = attention_softmax_forward(torch.bmm(q32_Bsd, k32_Bds), causal=causal)
        else:
            if causal:
                scores_Bss = torch.baddbmm(_causal_bias(q_Bsd.shape[1]), q32_Bsd, k32_Bds)
            else:
                scores_Bss = torch.bmm(q32_Bsd, k32_Bds)
            probs_Bss = torch.softmax(scores_Bss, dim=-1).to(q_Bsd.dtype)
            del scores_Bss
        out_Bsd = torch.bmm(probs_Bss, v_Bsd)
        ctx.save_for_backward(q_Bsd, k_Bsd, v_Bsd, probs_Bss, out_Bsd)
        ctx.scale = scale
        return out_Bsd

    @staticmethod
    def backward(ctx, grad_out_Bsd):
        q_Bsd, k_Bsd, v_Bsd, probs_Bss, out_Bsd = ctx.saved_tensors
        grad_out_Bsd = grad_out_Bsd.to(q_Bsd.dtype)
        grad_v_Bsd = torch.bmm(probs_Bss.transpose(1, 2), grad_out_Bsd)
        grad_out32_Bsd = _widen(grad_out_Bsd, ctx.fused)
        grad_probs_Bss = torch.bmm(grad_out32_Bsd, _widen(v_Bsd, ctx.fused).transpose(1, 2))
        # rowsum(P * dP) = rowsum(dO * O): a [B, s, d] product instead of an [B, s, s] one.
        row_B1s = row_dot_bsd(grad_out_Bsd, out_Bsd) if ctx.fused else None
        if row_B1s is None:
            row_B1s = (grad_out32_Bsd * out_Bsd.float()).sum(-1, keepdim=True)
        if ctx.fused:
            grad_scores_Bss = attention_softmax_backward(grad_probs_Bss, probs_Bss, row_B1s)
        else:
            grad_scores_Bss = grad_probs_Bss.sub_(row_B1s).mul_(probs_Bss).to(q_Bsd.dtype)
        del grad_probs_Bss
        grad_q_Bsd = torch.bmm(grad_scores_Bss, k_Bsd).mul_(ctx.scale)
        grad_k_Bsd = torch.bmm(grad_scores_Bss.transpose(1, 2), q_Bsd).mul_(ctx.scale)
        return grad_q_Bsd, grad_k_Bsd, grad_v_Bsd, None, None


class DispatchingCoreAttention(DotProductAttention):
    """DotProductAttention (same parameters) whose forward picks one of three implementations
    (module doc): Megatron's own forward, the explicit-scores CPU attention, or torch's SDPA."""

    def _own_paths_apply(self, attention_mask, attn_mask_type, attention_bias, packed_seq_params) -> bool:
        config = self.config
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        return (
            self.config.params_dtype != torch.float32
            and attention_mask is None
            and attention_bias is None
            and packed_seq_params is None
            and mask_type in (AttnMaskType.causal, AttnMaskType.no_mask)
            and self.softmax_offset is None
            and self.attention_dropout.p == 0.0
            and not config.apply_query_key_layer_scaling
            and self.scale_mask_softmax.window_size is None
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if not self._own_paths_apply(attention_mask, attn_mask_type, attention_bias, packed_seq_params):  # 1.
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        s, b, n, d = query.shape
        # [s, b, n, d] -> [b, n, s, d]
        q_bnsd = query.permute(1, 2, 0, 3)
        k_bgsd = key.permute(1, 2, 0, 3)
        v_bgsd = value.permute(1, 2, 0, 3)
        s_k = key.shape[0]
        if (
            query.device.type == "cpu"
            and key.shape[2] == n
            and (mask_type == AttnMaskType.no_mask or s_k == s)
            and b * n * s * s_k <= CPU_SCORES_MAX_ELEMENTS
        ):
            # 2. [b, n, s, d] -> [b * n, s, d]: a view (b and n are adjacent in memory), no copy.
            context_Bsd = _ScoresAttention.apply(
                q_bnsd.reshape(b * n, s, d), k_bgsd.reshape(b * n, s_k, d), v_bgsd.reshape(b * n, s_k, d),
                self.softmax_scale, mask_type == AttnMaskType.causal,
            )
            return context_Bsd.view(b, n, s, d).permute(2, 0, 1, 3).reshape(s, b, n * d)
        context_bnsd = F.scaled_dot_product_attention(  # 3.
            q_bnsd, k_bgsd, v_bgsd, is_causal=mask_type == AttnMaskType.causal, scale=self.softmax_scale,
            enable_gqa=k_bgsd.shape[1] != n,
        )
        # [b, n, s, d] -> [s, b, n * d]
        return context_bnsd.permute(2, 0, 1, 3).reshape(s, b, n * d)
