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
    """Epsilon of every norm (RMSNorm or LayerNorm)."""
    norm_type: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """The block, final and QK norms. 'rmsnorm': RMSNorm with a learnable scale (OLMoE).
    'layernorm': the paper's ablation, OLMo's `layer_norm_type: default` as OLMoE's configs set it
    (`layer_norm_with_affine: true`, `bias_for_layer_norm: false`): mean and variance removed, a
    learnable scale, no bias, so the parameter count is RMSNorm's. HF OLMoE has no LayerNorm, so
    such a model does not export to HF."""
    qk_norm: bool = True
    """A norm (norm_type) over the FULL q and k projections before the head split (OLMoE's QK-norm)."""
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
    router_load_balancing: Literal["micro_batch", "global_batch"] = "micro_batch"
    """Over which tokens the load-balancing loss counts each expert's share. 'micro_batch': the
    rank's micro-batch (OLMoE, megablocks; Megatron's 'aux_loss'). 'global_batch': the tokens of
    all micro-batches and data-parallel ranks of the step so far (Megatron's 'global_aux_loss',
    arXiv 2501.11873), beyond the paper."""
    router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    """'softmax' over all experts, then top-k, weights not renormalised (OLMoE). 'sigmoid': a
    sigmoid per expert, top-k, the k weights renormalised to sum to 1 when k > 1 (DeepSeek-V3;
    Megatron's 'sigmoid'), beyond the paper; needed for router_expert_bias."""
    router_expert_bias: bool = False
    """Aux-loss-free balancing (arXiv 2408.15664, DeepSeek-V3), beyond the paper: a per-expert bias,
    a float32 buffer saved in checkpoints, is added to the scores for choosing the top-k only (not to
    the weights), and after every step moves by router_bias_update_rate towards balance: up for the
    experts that got fewer tokens than the mean over the global batch, down for those that got more
    (Megatron's moe_router_enable_expert_bias, updated in finalize_model_grads, so also in a step
    skipped for a non-finite loss, as in Megatron-LM). Megatron-Core 0.16.1 supports it with
    router_score_function='sigmoid' only."""
    router_bias_update_rate: float = 1e-3
    """Step of the expert-bias update per optimizer step (DeepSeek-V3: 1e-3)."""
    router_type: Literal["token_choice", "expert_choice"] = "token_choice"
    """'token_choice': each token takes its top_k experts (OLMoE). 'expert_choice': each expert takes
    the top `expert_capacity(...)` tokens of each sequence by router score, so a token gets 0..E
    experts (megablocks' moe_expert_choice, the paper's ablation; model/expert_choice.py). The load
    is balanced by construction: no load-balancing loss (router_aux_loss_coeff must be 0); the
    z-loss applies as with token choice."""
    expert_capacity_factor: float = 1.0
    """expert_choice only: tokens each expert takes per sequence of S tokens, as a multiple of the
    token-choice average: C = floor(factor * top_k * S / num_experts) (megablocks: factor 1)."""
    init_std: float = 0.02
    """Std of the truncated-normal init of every matrix (embeddings, qkv, out, experts, router, head)."""
    init_cutoff_stds: float | None = 3.0
    """Truncation of the init at +- this many stds (OLMoE: 3 -> +-0.06). None: a plain normal
    N(0, init_std), no truncation (OLMo's `init_cutoff_factor: null`; the paper's ablation, where
    this diverged)."""
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
        self._validate_router_type()
        self._validate_balancing()
        for name in ("router_aux_loss_coeff", "router_z_loss_coeff", "init_std", "norm_eps", "rope_theta"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be >= 0")
        if self.init_cutoff_stds is not None and self.init_cutoff_stds <= 0:
            raise ConfigError(
                f"model.init_cutoff_stds={self.init_cutoff_stds} must be > 0 (OLMoE: 3), or null for a plain "
                "normal init without truncation"
            )

    def _validate_balancing(self) -> None:
        """router_load_balancing, router_score_function and the expert bias (token choice only)."""
        changed = [name for name, default in (("router_load_balancing", "micro_batch"),
                                              ("router_score_function", "softmax"), ("router_expert_bias", False))
                   if getattr(self, name) != default]
        if changed and (not self.is_moe or self.router_type != "token_choice"):
            raise ConfigError(
                f"model.{changed[0]}={getattr(self, changed[0])!r} applies to token-choice MoE routing only "
                f"(model.num_experts={self.num_experts}, model.router_type={self.router_type!r}); drop it"
            )
        if self.router_load_balancing == "global_batch" and self.router_aux_loss_coeff == 0:
            raise ConfigError(
                "model.router_load_balancing='global_batch' chooses how the load-balancing loss counts tokens, "
                "but model.router_aux_loss_coeff=0 turns that loss off; set a coefficient (OLMoE: 0.01) or "
                "leave router_load_balancing='micro_batch'"
            )
        if self.router_expert_bias and self.router_score_function != "sigmoid":
            raise ConfigError(
                f"model.router_expert_bias=true needs model.router_score_function='sigmoid', not "
                f"{self.router_score_function!r} (Megatron-Core 0.16.1 adds the expert bias to sigmoid scores "
                "only); set --model.router_score_function=sigmoid"
            )
        if self.router_bias_update_rate < 0:
            raise ConfigError(
                f"model.router_bias_update_rate={self.router_bias_update_rate} must be >= 0 (DeepSeek-V3: 1e-3)"
            )

    def _validate_router_type(self) -> None:
        if self.router_type == "token_choice":
            if self.expert_capacity_factor != 1.0:
                raise ConfigError(
                    f"model.expert_capacity_factor={self.expert_capacity_factor} applies to expert-choice routing "
                    "only; set model.router_type='expert_choice' or leave the factor at 1.0"
                )
            return
        if not self.is_moe:
            raise ConfigError("model.router_type='expert_choice' needs model.num_experts > 0")
        if not self.expert_capacity_factor > 0:
            raise ConfigError(
                f"model.expert_capacity_factor={self.expert_capacity_factor} must be > 0 "
                "(1.0: each expert takes top_k * S / num_experts tokens of a sequence, as megablocks)"
            )
        if self.expert_capacity_factor * self.top_k > self.num_experts:
            raise ConfigError(
                f"model.expert_capacity_factor={self.expert_capacity_factor} * model.top_k={self.top_k} must be <= "
                f"model.num_experts={self.num_experts}: an expert cannot take more than every token; use a "
                f"factor <= {self.num_experts / self.top_k:g}"
            )
        if self.router_aux_loss_coeff != 0:
            raise ConfigError(
                f"model.router_aux_loss_coeff={self.router_aux_loss_coeff} has no effect with "
                "model.router_type='expert_choice' (every expert takes the same number of tokens; megablocks "
                "records no load-balancing loss): set model.router_aux_loss_coeff=0"
            )

    def expert_capacity(self, seq_length: int) -> int:
        """Tokens each expert takes from one sequence of `seq_length` tokens (expert_choice)."""
        return expert_capacity(seq_length=seq_length, top_k=self.top_k, num_experts=self.num_experts,
                               capacity_factor=self.expert_capacity_factor)

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


def expert_capacity(*, seq_length: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Expert-choice capacity C = floor(capacity_factor * top_k * seq_length / num_experts).

    The floor is megablocks' `(moe_top_k * sl) // moe_num_experts` (its factor is 1); the 1e-9 keeps a
    product that is an integer in exact arithmetic from flooring one below through float rounding.
    """
    return math.floor(capacity_factor * top_k * seq_length / num_experts + 1e-9)
