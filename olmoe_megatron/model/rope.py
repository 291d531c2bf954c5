"""Rotary embeddings for CPU runs through Megatron's `apply_rope_fusion` hook.

Megatron applies RoPE either unfused (seven bf16 operators forward, more backward, per q and per
k in every layer: ~3 ms of an olmoe_small step on 2 cores) or, with `apply_rope_fusion`, through
`rope_utils.fused_apply_rotary_pos_emb`, which Transformer Engine provides on GPUs and which is
None without it. On CPU `install_cpu_rope` fills that slot with `cpu_fused_apply_rotary_pos_emb`:
bf16 inputs run the C kernel (`ops.cpu.rope_bf16`: the same bf16 roundings as the unfused
code, one pass each way); everything else (fp32, interleaved or partial rotary, mscale != 1) runs
Megatron's own unfused function, so fp32 stays bit for bit what it was.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings import rope_utils

from olmoe_megatron.ops.cpu import kernels_apply, rope_bf16


_TABLES: dict[str, tuple] = {}


def _cos_sin(freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 cos/sin tables [s, d] of `freqs`; Megatron's RotaryEmbedding caches its freqs tensor, so
    the tables of the last one are kept (every layer's q and k reuse them)."""
    cached = _TABLES.get("last")
    if cached is not None and cached[0] is freqs and cached[1] == (freqs._version, dtype):
        return cached[2], cached[3]
    angles_SD = freqs.reshape(freqs.shape[0], freqs.shape[-1])
    cos_SD, sin_SD = torch.cos(angles_SD).to(dtype), torch.sin(angles_SD).to(dtype)
    _TABLES["last"] = (freqs, (freqs._version, dtype), cos_SD, sin_SD)
    return cos_SD, sin_SD


def cpu_fused_apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False, **_) -> torch.Tensor:
    """Megatron's fused-RoPE signature (t [s, b, heads, d], freqs [s, 1, 1, rotary dim])."""
    full_rotary = freqs.dim() == 4 and freqs.shape[-1] == t.shape[-1] and freqs.shape[1] == freqs.shape[2] == 1
    if not interleaved and full_rotary and freqs.shape[0] == t.shape[0] and kernels_apply(t):
        return rope_bf16(t, *_cos_sin(freqs, t.dtype))
    return rope_utils._apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved)


def install_cpu_rope() -> bool:
    """Puts `cpu_fused_apply_rotary_pos_emb` in Megatron's fused-RoPE slot when nothing (no Transformer
    Engine) fills it; returns whether the slot now holds it (then set apply_rope_fusion). Called by
    the model build (`model.build.build_transformer_config`) of CPU runs, nowhere else."""
    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = cpu_fused_apply_rotary_pos_emb
    return rope_utils.fused_apply_rotary_pos_emb is cpu_fused_apply_rotary_pos_emb
