"""Core attention on torch's scaled_dot_product_attention (the local spec's default core attention).

Megatron's local `DotProductAttention` materialises the [b*heads, s, s] scores with baddbmm, masks
and softmaxes them in separate kernels and keeps the probabilities for backward. On CPU, SDPA's
flash kernel does the same maths tiled, in fp32 accumulation, without the s x s buffers: on the
olmoe_small benchmark (seq 256) the attention forward and backward take about half the time.
On GPU the local spec gets SDPA's flash / memory-efficient kernels the same way.

It takes over bf16/fp16 attention in the cases it computes identically (causal or no mask, no
dropout, vanilla softmax, no window, no query-key layer scaling). fp32 runs keep Megatron's forward:
SDPA's tiled reductions differ from it in the last bits, and fp32 is the reference precision
(golden losses, layout equivalence tests) that must stay bit-identical.

Legend: s sequence, b micro-batch, n heads on this rank, g query groups on this rank, d head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPACoreAttention(DotProductAttention):
    """DotProductAttention with its forward on F.scaled_dot_product_attention (same parameters)."""

    def _sdpa_applies(self, attention_mask, attn_mask_type, attention_bias, packed_seq_params) -> bool:
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
        if not self._sdpa_applies(attention_mask, attn_mask_type, attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        s, b, n, d = query.shape
        # [s, b, n, d] -> [b, n, s, d]
        q_bnsd = query.permute(1, 2, 0, 3)
        k_bgsd = key.permute(1, 2, 0, 3)
        v_bgsd = value.permute(1, 2, 0, 3)
        context_bnsd = F.scaled_dot_product_attention(
            q_bnsd, k_bgsd, v_bgsd, is_causal=mask_type == AttnMaskType.causal, scale=self.softmax_scale,
            enable_gqa=k_bgsd.shape[1] != n,
        )
        # [b, n, s, d] -> [s, b, n * d]
        return context_bnsd.permute(2, 0, 1, 3).reshape(s, b, n * d)
