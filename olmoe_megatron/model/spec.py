"""Megatron-Core ModuleSpecs for OLMoE layers: a local spec (CPU and GPU) and a TE spec (GPU).

Both specs give the same checkpoint keys: the local spec maps its separate norms onto the keys of
TE's fused layer-norm linears, as Megatron's own local spec does.
"""

from __future__ import annotations

from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from olmoe_megatron.model.config import ModelConfig
from olmoe_megatron.model.attention import SDPACoreAttention
from olmoe_megatron.model.experts import GroupedSwiGLUExperts
from olmoe_megatron.model.moe_layer import OlmoeMoELayer
from olmoe_megatron.model.norms import FullWidthQKNorm, RMSNorm


def _qk_norm(model: ModelConfig, projection: str):
    if not model.qk_norm:
        return IdentityOp
    return ModuleSpec(module=FullWidthQKNorm, params={"projection": projection})


def _mlp_spec(model: ModelConfig, backend, *, use_te: bool) -> ModuleSpec:
    if not model.is_moe:
        return ModuleSpec(
            module=MLP,
            submodules=MLPSubmodules(
                linear_fc1=backend.column_parallel_layer_norm_linear() if use_te else backend.column_parallel_linear(),
                linear_fc2=backend.row_parallel_linear(),
            ),
        )
    spec = get_moe_module_spec_for_backend(
        backend=backend,
        num_experts=model.num_experts,
        moe_grouped_gemm=use_te and model.expert_impl == "grouped",
    )
    spec.module = OlmoeMoELayer
    if not use_te and model.expert_impl == "grouped":
        spec.submodules.experts = ModuleSpec(
            module=GroupedSwiGLUExperts, submodules=spec.submodules.experts.submodules
        )
    return spec


def layer_spec(model: ModelConfig, *, use_te: bool = False) -> ModuleSpec:
    """The ModuleSpec of one OLMoE decoder layer.

    Args:
        model: the architecture.
        use_te: Transformer Engine modules (GPU; needed for FP8) instead of local ones.
    """
    backend = te_backend() if use_te else LocalSpecProvider()
    dense_fused_norm = use_te and not model.is_moe  # TE fuses the pre-MLP norm into fc1 for dense MLPs
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp if use_te else RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=backend.column_parallel_layer_norm_linear() if use_te else backend.column_parallel_linear(),
                    core_attention=backend.core_attention() if use_te else SDPACoreAttention,
                    linear_proj=backend.row_parallel_linear(),
                    q_layernorm=_qk_norm(model, "query"),
                    k_layernorm=_qk_norm(model, "key"),
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp if dense_fused_norm else (backend.layer_norm() if use_te else RMSNorm),
            mlp=_mlp_spec(model, backend, use_te=use_te),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=(
                {}
                if use_te
                else {
                    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                    **({} if model.is_moe else {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}),
                }
            ),
        ),
    )


def block_spec(model: ModelConfig, *, num_layers: int, use_te: bool = False) -> TransformerBlockSubmodules:
    """`num_layers` OLMoE layers plus the final RMSNorm (this rank's pipeline chunk)."""
    final_norm = te_backend().layer_norm() if use_te else RMSNorm
    return TransformerBlockSubmodules(layer_specs=[layer_spec(model, use_te=use_te)] * num_layers, layer_norm=final_norm)


def te_backend():
    """Transformer Engine's spec provider, or a clear error saying what is missing."""
    try:
        import transformer_engine  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            "model.spec=te needs Transformer Engine: pip install 'olmoe-megatron[gpu]' on a machine "
            "with a CUDA build of torch (it cannot be installed on CPU-only machines, where "
            f"megatron-core then fails to import). Import error: {exc}"
        ) from None
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    return TESpecProvider()
