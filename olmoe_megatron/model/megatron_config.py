"""The one place our configs become Megatron-Core's TransformerConfig.

Every OLMoE-specific override of a Megatron default is here, with the reason:
truncated-normal init without depth scaling, softmax-then-top-k router in fp32 without
renormalisation, OLMoE's loss coefficients converted to Megatron's per-layer ones, and fusions that
need CUDA kernels switched off where those kernels are absent. A pure translation: it changes
nothing outside the config it returns (the model build fills Megatron's fused-RoPE slot on CPU
before asking for `cpu_rope`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from olmoe_megatron.model.config import ModelConfig
from olmoe_megatron.model.precision import PrecisionConfig, megatron_fp8_fields
from olmoe_megatron.parallel.context import backend_uses_cuda
from olmoe_megatron.parallel.layout import ParallelLayout


def truncated_normal_init(std: float, cutoff_stds: float):
    """OLMoE's init: N(0, std) truncated at +-cutoff_stds*std (0.02 cut at +-0.06)."""
    return functools.partial(torch.nn.init.trunc_normal_, mean=0.0, std=std, a=-cutoff_stds * std, b=cutoff_stds * std)


def to_transformer_config(
    model: ModelConfig,
    layout: ParallelLayout,
    *,
    precision: PrecisionConfig,
    backend: str,
    use_te: bool = False,
    recompute: str | None = None,
    cpu_rope: bool = False,
) -> TransformerConfig:
    """Maps (model, layout, precision) to Megatron-Core's TransformerConfig.

    Args:
        model: architecture and losses.
        layout: parallel degrees (the process groups must already exist).
        precision: dtype and FP8.
        backend: 'nccl' or 'gloo' (gloo forbids batched p2p with interleaved pipelines).
        use_te: the layers are Transformer Engine modules (enables TE-only fusions).
        recompute: None, 'selective' (core attention + MoE activations) or 'full'.
        cpu_rope: Megatron's fused-RoPE slot holds the CPU kernel (`model.rope.install_cpu_rope`,
            called by the model build): use it.
    """
    init = truncated_normal_init(model.init_std, model.init_cutoff_stds)
    dtype = precision.torch_dtype
    on_gpu = backend_uses_cuda(backend)
    batch_p2p = layout.use_batch_p2p_comm(backend=backend)
    interleaved = layout.vpp is not None and layout.vpp > 1
    moe_fields = {}
    if model.is_moe:
        moe_fields = dict(
            num_moe_experts=model.num_experts,
            moe_router_topk=model.top_k,
            moe_ffn_hidden_size=model.expert_ffn_hidden_size,
            # OLMoE: softmax over all experts in fp32, then top-k, weights NOT renormalised.
            moe_router_score_function="softmax",
            moe_router_pre_softmax=True,
            moe_router_dtype="fp32",
            moe_router_topk_scaling_factor=None,
            moe_router_load_balancing_type="aux_loss" if model.router_aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=model.megatron_aux_loss_coeff,
            moe_z_loss_coeff=model.megatron_z_loss_coeff if model.router_z_loss_coeff > 0 else None,
            moe_token_dispatcher_type=model.token_dispatcher,
            moe_grouped_gemm=use_te and model.expert_impl == "grouped",
            moe_shared_expert_intermediate_size=(
                model.num_shared_experts * model.expert_ffn_hidden_size if model.num_shared_experts else None
            ),
            moe_permute_fusion=False,
            moe_router_fusion=False,
        )
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.d_model,
        num_attention_heads=model.num_heads,
        num_query_groups=model.kv_heads,
        kv_channels=model.kv_channels,
        ffn_hidden_size=model.expert_ffn_hidden_size if model.is_moe else model.dense_ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        # Our spec builds OLMoE's full-width QK-norm itself (model.qk_norm). Megatron's flag means
        # per-head norms replicated over TP, and finalize_model_grads would then all-reduce the
        # TP-sharded full-width weights' gradients by name: wrong. Keep it off.
        qk_layernorm=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Init: the same truncated normal everywhere, no 1/sqrt(2L) scaling of output projections.
        init_method=init,
        output_layer_init_method=init,
        embedding_init_method=init,
        init_method_std=model.init_std,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision.dtype == "bf16",
        fp16=False,
        # Fusions need CUDA kernels (TE, apex or megatron's own); off where they are absent.
        gradient_accumulation_fusion=on_gpu and use_te,
        # On CPU, Megatron's fused-RoPE slot holds our kernel (model/rope.py), bit-identical to the
        # unfused code in fp32 and with the same bf16 roundings.
        apply_rope_fusion=(on_gpu and use_te) or cpu_rope,
        masked_softmax_fusion=False,
        bias_activation_fusion=on_gpu and use_te,
        bias_dropout_fusion=on_gpu,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        sequence_parallel=layout.sequence_parallel,
        batch_p2p_comm=batch_p2p,
        overlap_p2p_comm=interleaved and not batch_p2p,
        recompute_granularity=recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
        recompute_modules=["core_attn", "moe_act"] if recompute == "selective" else None,
        # Megatron's default "full" is a deprecated alias of [] (the whole layer) and warns on every build.
        cuda_graph_scope=[],
        **moe_fields,
        **megatron_fp8_fields(precision),
    )
