"""The one place our configs become Megatron-Core's TransformerConfig.

Every OLMoE-specific override of a Megatron default is here, with the reason:
truncated-normal init without depth scaling, softmax-then-top-k router in fp32 without
renormalisation, OLMoE's loss coefficients converted to Megatron's per-layer ones, and fusions
switched on exactly where their kernels exist (`fusions`: Megatron-Core's own version checks). A
pure translation: it changes nothing outside the config it returns (the model build fills
Megatron's fused-RoPE slot on CPU before asking for `cpu_rope`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig
from packaging.version import Version

from olmoe_megatron.model.config import ModelConfig
from olmoe_megatron.model.precision import (
    PrecisionConfig,
    check_fp8_moe_act_recompute,
    megatron_fp8_fields,
    transformer_engine_version,
)
from olmoe_megatron.parallel.context import backend_uses_cuda
from olmoe_megatron.parallel.layout import ParallelLayout


def truncated_normal_init(std: float, cutoff_stds: float | None):
    """OLMoE's init: N(0, std) truncated at +-cutoff_stds*std (0.02 cut at +-0.06); cutoff_stds None:
    the plain N(0, std) of the paper's init ablation (ModelConfig.init_cutoff_stds)."""
    if cutoff_stds is None:
        return functools.partial(torch.nn.init.normal_, mean=0.0, std=std)
    return functools.partial(torch.nn.init.trunc_normal_, mean=0.0, std=std, a=-cutoff_stds * std, b=cutoff_stds * std)


#: ModelConfig.router_load_balancing -> Megatron's moe_router_load_balancing_type.
LOAD_BALANCING_TYPES = {"micro_batch": "aux_loss", "global_batch": "global_aux_loss"}


#: The TE versions Megatron-Core 0.16.1 checks for each fusion: the fused permutation
#: (moe_utils.permute: "Please install TE >= 2.1.0") and the fused router, whose TE functions
#: extensions/transformer_engine.py imports only `if is_te_min_version("2.7.0.dev")`.
PERMUTE_FUSION_MIN_TE = "2.1.0"
ROUTER_FUSION_MIN_TE = "2.7.0.dev0"


def fusions(*, on_gpu: bool, use_te: bool, te_version: str | None, bf16: bool) -> dict:
    """TransformerConfig's fusion switches: on exactly where their kernels exist.

    Args:
        on_gpu: the backend is NCCL on CUDA devices.
        use_te: the layers are Transformer Engine modules.
        te_version: the installed TE's version (None: no TE).
        bf16: the model computes in bf16.

    On CPU every fusion is off (rotary embeddings excepted: `to_transformer_config`'s `cpu_rope`).
    Megatron's native fused cross-entropy (`fusions/fused_cross_entropy.py`, no TE) replaces the
    unfused loss, which copies the logits to fp32 (micro-batch 4 x 4096 x 50,304 x 4 bytes = 3.3 GB);
    its backward casts the logits' gradient to bf16 unconditionally, so fp32 runs keep the unfused one.
    """
    te = on_gpu and use_te and te_version is not None
    return dict(
        gradient_accumulation_fusion=on_gpu and use_te,
        bias_activation_fusion=on_gpu and use_te,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=on_gpu and bf16,
        cross_entropy_fusion_impl="native",
        moe_permute_fusion=te and Version(te_version) >= Version(PERMUTE_FUSION_MIN_TE),
        moe_router_fusion=te and Version(te_version) >= Version(ROUTER_FUSION_MIN_TE),
    )


def selective_recompute_modules(model: ModelConfig, *, use_te: bool) -> list[str]:
    """What train.recompute='selective' recomputes: core attention, and the MoE activation where
    Megatron-Core implements that (grouped-GEMM experts, which need TE; it refuses moe_act otherwise)."""
    grouped_gemm = use_te and model.is_moe and model.expert_impl == "grouped"
    return ["core_attn", "moe_act"] if grouped_gemm else ["core_attn"]


def to_transformer_config(
    model: ModelConfig,
    layout: ParallelLayout,
    *,
    precision: PrecisionConfig,
    backend: str,
    use_te: bool = False,
    te_version: str | None = None,
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
        te_version: the TE version the fusions are chosen for (None with use_te: the installed one).
        recompute: None, 'selective' (`selective_recompute_modules`) or 'full'.
        cpu_rope: Megatron's fused-RoPE slot holds the CPU kernel (`model.rope.install_cpu_rope`,
            called by the model build): use it.
    """
    init = truncated_normal_init(model.init_std, model.init_cutoff_stds)
    dtype = precision.torch_dtype
    on_gpu = backend_uses_cuda(backend)
    batch_p2p = layout.use_batch_p2p_comm(backend=backend)
    interleaved = layout.vpp is not None and layout.vpp > 1
    if use_te and te_version is None:
        te_version = transformer_engine_version()
    fusion_fields = fusions(on_gpu=on_gpu, use_te=use_te, te_version=te_version, bf16=precision.dtype == "bf16")
    moe_fusions = {name: fusion_fields.pop(name) for name in ("moe_permute_fusion", "moe_router_fusion")}
    recompute_modules = selective_recompute_modules(model, use_te=use_te) if recompute == "selective" else None
    if precision.fp8 is not None and recompute_modules and "moe_act" in recompute_modules:
        check_fp8_moe_act_recompute(fp8_recipe=precision.fp8_recipe, te_version=te_version)
    moe_fields = {}
    if model.is_moe:
        moe_fields = dict(
            num_moe_experts=model.num_experts,
            moe_router_topk=model.top_k,
            moe_ffn_hidden_size=model.expert_ffn_hidden_size,
            # OLMoE: softmax over all experts in fp32, then top-k, weights NOT renormalised ('sigmoid',
            # beyond the paper, renormalises the k weights: Megatron's sigmoid routing).
            moe_router_score_function=model.router_score_function,
            moe_router_pre_softmax=True,
            moe_router_dtype="fp32",
            moe_router_topk_scaling_factor=None,
            moe_router_load_balancing_type=(
                LOAD_BALANCING_TYPES[model.router_load_balancing] if model.router_aux_loss_coeff > 0 else "none"
            ),
            # Aux-loss-free balancing: finalize_model_grads (our step's grad finalisation) moves the bias.
            moe_router_enable_expert_bias=model.router_expert_bias,
            moe_router_bias_update_rate=model.router_bias_update_rate,
            moe_aux_loss_coeff=model.megatron_aux_loss_coeff,
            moe_z_loss_coeff=model.megatron_z_loss_coeff if model.router_z_loss_coeff > 0 else None,
            moe_token_dispatcher_type=model.token_dispatcher,
            # Expert choice (model/expert_choice.py): our router reads the factor from here, and
            # with it set Megatron's all-to-all dispatcher sizes its permutation from the routing
            # map (a token gets 0..E experts) instead of tokens * top_k. Megatron's own token
            # dropping, in TopKRouter.routing, is never reached: ExpertChoiceRouter replaces it.
            moe_expert_capacity_factor=(
                model.expert_capacity_factor if model.router_type == "expert_choice" else None
            ),
            moe_grouped_gemm=use_te and model.expert_impl == "grouped",
            moe_shared_expert_intermediate_size=(
                model.num_shared_experts * model.expert_ffn_hidden_size if model.num_shared_experts else None
            ),
            **moe_fusions,
        )
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.d_model,
        num_attention_heads=model.num_heads,
        num_query_groups=model.kv_heads,
        kv_channels=model.kv_channels,
        ffn_hidden_size=model.expert_ffn_hidden_size if model.is_moe else model.dense_ffn_hidden_size,
        normalization="RMSNorm" if model.norm_type == "rmsnorm" else "LayerNorm",
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
        **fusion_fields,
        # On CPU, Megatron's fused-RoPE slot holds our kernel (model/rope.py), bit-identical to the
        # unfused code in fp32 and with the same bf16 roundings.
        apply_rope_fusion=(on_gpu and use_te) or cpu_rope,
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
        recompute_modules=recompute_modules,
        # Megatron's default "full" is a deprecated alias of [] (the whole layer) and warns on every build.
        cuda_graph_scope=[],
        **moe_fields,
        **megatron_fp8_fields(precision),
    )
