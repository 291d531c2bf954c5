"""The OLMoE model config: architecture, router, losses and init, in OLMoE's own terms.

Numbers and semantics follow shared/OLMOE_FACTS.md. The user-facing load-balancing and z-loss
weights are OLMoE's (0.01 and 0.001, normalised over layers and top-k as megablocks trained them);
`megatron_aux_loss_coeff` / `megatron_z_loss_coeff` convert them to Megatron's per-layer
coefficients.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from olmoe_megatron.config import Config, ConfigError, divisors


@dataclasses.dataclass(kw_only=True, frozen=True)
class ModelConfig(Config):
    """An OLMoE-family decoder: pre-norm RMSNorm, RoPE, full-width QK-norm, SwiGLU experts."""

    num_layers: int = 16
    """Decoder layers; every layer is MoE unless num_experts == 0 (dense baseline)."""
    d_model: int = 2048
    """Hidden size."""
    num_heads: int = 16
    """Attention heads."""
    num_kv_heads: int | None = None
    """Key/value heads (None: plain multi-head attention, as OLMoE)."""
    head_dim: int | None = None
    """Per-head width (None: d_model // num_heads)."""
    vocab_size: int = 50280
    """Token ids the tokenizer produces (OLMoE: 50,280)."""
    padded_vocab_size: int = 50304
    """Rows of the embedding and output matrices (OLMoE pads to 50,304 = 128 * 393)."""
    max_sequence_length: int = 4096
    """Longest sequence RoPE is set up for."""
    rope_theta: float = 10_000.0
    """RoPE base, applied over the full head dim, rotate-half."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    qk_norm: bool = True
    """RMSNorm over the FULL q and k projections before the head split (OLMoE's QK-norm)."""
    num_experts: int = 64
    """Routed experts per layer (0: dense model)."""
    top_k: int = 8
    """Experts each token goes to."""
    expert_ffn_hidden_size: int = 1024
    """SwiGLU hidden width of one expert."""
    num_shared_experts: int = 0
    """Always-on experts of width expert_ffn_hidden_size (paper ablation; OLMoE: 0)."""
    ffn_hidden_size: int | None = None
    """SwiGLU width of the dense FFN (dense models only; None: top_k * expert_ffn_hidden_size)."""
    router_aux_loss_coeff: float = 0.01
    """OLMoE load-balancing weight (mean over layers of the Switch loss); 0 turns it off."""
    router_z_loss_coeff: float = 0.001
    """OLMoE router z-loss weight (normalised by layers and top_k); 0 turns it off."""
    init_std: float = 0.02
    """Std of the truncated-normal init of every matrix (embeddings, qkv, out, experts, router, head)."""
    init_cutoff_stds: float = 3.0
    """Truncation of the init at +- this many stds (OLMoE: 3 -> +-0.06)."""
    token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    """Megatron token dispatcher ('flex' needs DeepEP and is not offered)."""
    expert_impl: Literal["grouped", "sequential"] = "grouped"
    """How the local experts' GEMMs run. 'grouped': with Transformer Engine, Megatron's TEGroupedMLP;
    in the local spec, `PaddedOrStackedSwiGLUExperts` on SequentialMLP's parameters and checkpoints:
    on CPU one GEMM per expert over its rows padded to a multiple of 32 (bf16/fp16) with
    SwiGLU * probabilities fused, on CUDA one torch._grouped_mm over the expert weights stacked in
    every forward. 'sequential': Megatron's SequentialMLP, a loop of expert MLPs."""

    # ----------------------------------------------------------------- derived values
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def kv_channels(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

    @property
    def dense_ffn_hidden_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return self.top_k * self.expert_ffn_hidden_size

    @property
    def megatron_aux_loss_coeff(self) -> float:
        """Megatron applies its coefficient per layer: OLMoE's mean over layers is w / L."""
        return self.router_aux_loss_coeff / self.num_layers

    @property
    def megatron_z_loss_coeff(self) -> float:
        """OLMoE divides the summed z-loss by L * T * k; Megatron's per-layer mean divides by T."""
        return self.router_z_loss_coeff / (self.num_layers * self.top_k)

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        for name in ("num_layers", "d_model", "num_heads", "vocab_size", "padded_vocab_size",
                     "max_sequence_length", "expert_ffn_hidden_size"):
            value = getattr(self, name)
            if value <= 0:
                raise ConfigError(f"model.{name}={value} must be positive")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} must be divisible by model.num_heads={self.num_heads} "
                f"(or set model.head_dim); try num_heads in {divisors(self.d_model)[:12]}"
            )
        if self.num_heads % self.kv_heads:
            raise ConfigError(
                f"model.num_kv_heads={self.kv_heads} must divide model.num_heads={self.num_heads}; "
                f"use one of {divisors(self.num_heads)}"
            )
        if self.padded_vocab_size < self.vocab_size:
            raise ConfigError(
                f"model.padded_vocab_size={self.padded_vocab_size} must be >= model.vocab_size="
                f"{self.vocab_size}; use {128 * math.ceil(self.vocab_size / 128)}"
            )
        if self.num_experts < 0:
            raise ConfigError(f"model.num_experts={self.num_experts} must be >= 0 (0 for a dense model)")
        if self.is_moe:
            if not 1 <= self.top_k <= self.num_experts:
                raise ConfigError(
                    f"model.top_k={self.top_k} must be between 1 and model.num_experts={self.num_experts}"
                )
        if self.num_shared_experts not in (0, 1):
            raise ConfigError(
                f"model.num_shared_experts={self.num_shared_experts} must be 0 or 1 "
                "(Megatron builds one shared expert; widen expert_ffn_hidden_size for more)"
            )
        if self.num_shared_experts and not self.is_moe:
            raise ConfigError("model.num_shared_experts=1 needs model.num_experts > 0")
        for name in ("router_aux_loss_coeff", "router_z_loss_coeff", "init_std", "norm_eps", "rope_theta"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be >= 0")
        if self.init_cutoff_stds <= 0:
            raise ConfigError(f"model.init_cutoff_stds={self.init_cutoff_stds} must be > 0 (OLMoE: 3)")

    # ----------------------------------------------------------------- parameter counts
    def attention_params_per_layer(self) -> int:
        q = self.num_heads * self.kv_channels
        kv = self.kv_heads * self.kv_channels
        qkv = self.d_model * (q + 2 * kv)
        out = q * self.d_model
        qk_norm = (q + kv) if self.qk_norm else 0
        return qkv + out + qk_norm

    def expert_params(self) -> int:
        """One SwiGLU expert: gate and up (d -> F each) and down (F -> d)."""
        return 3 * self.d_model * self.expert_ffn_hidden_size

    def mlp_params_per_layer(self, *, active: bool) -> int:
        if not self.is_moe:
            return 3 * self.d_model * self.dense_ffn_hidden_size
        routed = (self.top_k if active else self.num_experts) * self.expert_params()
        router = self.d_model * self.num_experts
        shared = self.num_shared_experts * self.expert_params()
        return routed + router + shared

    def num_params(self, *, active: bool = False) -> int:
        """Total parameters (active=False) or parameters each token uses (active=True)."""
        norms = 2 * self.d_model
        per_layer = self.attention_params_per_layer() + self.mlp_params_per_layer(active=active) + norms
        embed = self.padded_vocab_size * self.d_model
        head = self.padded_vocab_size * self.d_model
        return self.num_layers * per_layer + embed + head + self.d_model

    def flops_per_token(self, seq_length: int) -> float:
        """Model FLOPs per trained token (forward + backward, no recompute).

        6 * (active matmul parameters, embeddings excluded) + attention scores and values:
        12 * L * (heads * head_dim) * seq (forward 2*2*seq*width per token, times 3 for backward).
        """
        active = self.num_params(active=True) - self.padded_vocab_size * self.d_model - self.d_model
        norms = self.num_layers * (2 * self.d_model + (self.num_heads + self.kv_heads) * self.kv_channels * self.qk_norm)
        matmul_params = active - norms
        attention = 12 * self.num_layers * self.num_heads * self.kv_channels * seq_length
        return 6.0 * matmul_params + attention
