"""Megatron-Core ModuleSpecs for OLMoE layers: a local spec (CPU and GPU) and a TE spec (GPU).

Both specs give the same checkpoint keys: the local spec maps its separate norms onto the keys of
TE's fused layer-norm linears, as Megatron's own local spec does. With model.norm_type='layernorm'
(the paper's norm ablation) the TE spec keeps our norm modules too, ahead of TE's plain linears:
TE's LayerNorm always has a bias, OLMo's has none. The local spec names Megatron's
modules directly (not through `megatron.core.models.backends`, whose import warns that apex is
missing although no apex module is used here). The MoE layer is `OlmoeMoELayer` with OLMoE's router
in `MoESubmodules.router`; it gets its process groups through the spec (see `_moe_spec`).
"""

from __future__ import annotations

import logging

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from olmoe_megatron.model.config import ModelConfig
from olmoe_megatron.model.attention import DispatchingCoreAttention
from olmoe_megatron.model.expert_choice import ExpertChoiceRouter
from olmoe_megatron.model.experts import PaddedOrStackedSwiGLUExperts
from olmoe_megatron.model.moe_layer import OlmoeMoELayer, OlmoeTopKRouter
from olmoe_megatron.model.norms import FullWidthQKNorm, block_norm


def _qk_norm(model: ModelConfig, projection: str):
    if not model.qk_norm:
        return IdentityOp
    return ModuleSpec(module=FullWidthQKNorm, params={"projection": projection, "norm_type": model.norm_type})


def _te_fuses_norms(model: ModelConfig, *, use_te: bool) -> bool:
    """TE's norm modules (fused into the next linear where they can be) serve RMSNorm only (module doc)."""
    return use_te and model.norm_type == "rmsnorm"


def _local_mlp_submodules() -> MLPSubmodules:
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def _moe_spec(model: ModelConfig, *, use_te: bool, pg_collection) -> ModuleSpec:
    """OLMoE's MoE layer: our router and experts in Megatron's MoESubmodules.

    Megatron's TransformerLayer passes process groups only to MoE layers whose class is exactly
    MoELayer; OlmoeMoELayer (a subclass) gets them here, as a spec parameter. The router is OLMoE's
    token choice or, with model.router_type='expert_choice', `ExpertChoiceRouter`.
    """
    router = ExpertChoiceRouter if model.router_type == "expert_choice" else OlmoeTopKRouter
    if use_te:
        from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend

        submodules = get_moe_module_spec_for_backend(
            backend=te_backend(), num_experts=model.num_experts, moe_grouped_gemm=model.expert_impl == "grouped",
        ).submodules
        submodules.router = router
    else:
        experts = SequentialMLP if model.expert_impl == "sequential" else PaddedOrStackedSwiGLUExperts
        submodules = MoESubmodules(
            experts=ModuleSpec(module=experts, submodules=_local_mlp_submodules()),
            shared_experts=ModuleSpec(module=SharedExpertMLP, submodules=_local_mlp_submodules()),
            router=router,
        )
    return ModuleSpec(
        module=OlmoeMoELayer,
        params={"pg_collection": pg_collection},
        submodules=submodules,
        metainfo={"fuse_pre_mlp_layernorm": False},
    )


def _mlp_spec(model: ModelConfig, backend, *, use_te: bool, pg_collection) -> ModuleSpec:
    if model.is_moe:
        return _moe_spec(model, use_te=use_te, pg_collection=pg_collection)
    if _te_fuses_norms(model, use_te=use_te):
        fc1 = backend.column_parallel_layer_norm_linear()
    else:
        fc1 = backend.column_parallel_linear() if use_te else ColumnParallelLinear
    return ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(
            linear_fc1=fc1,
            linear_fc2=backend.row_parallel_linear() if use_te else RowParallelLinear,
        ),
    )


def layer_spec(model: ModelConfig, *, use_te: bool = False, pg_collection=None) -> ModuleSpec:
    """The ModuleSpec of one OLMoE decoder layer.

    Args:
        model: the architecture.
        use_te: Transformer Engine modules (GPU; needed for FP8) instead of local ones.
        pg_collection: the model's process groups (Megatron's ProcessGroupCollection), for the MoE
            layer; None: Megatron's global groups.
    """
    te = te_backend() if use_te else None
    norm = block_norm(model.norm_type)
    fused = _te_fuses_norms(model, use_te=use_te)
    dense_fused_norm = fused and not model.is_moe  # TE fuses the pre-MLP norm into fc1 for dense MLPs
    if fused:
        linear_qkv = te.column_parallel_layer_norm_linear()
    else:
        linear_qkv = te.column_parallel_linear() if use_te else ColumnParallelLinear
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp if fused else norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=linear_qkv,
                    core_attention=te.core_attention() if use_te else DispatchingCoreAttention,
                    linear_proj=te.row_parallel_linear() if use_te else RowParallelLinear,
                    q_layernorm=_qk_norm(model, "query"),
                    k_layernorm=_qk_norm(model, "key"),
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp if dense_fused_norm else (te.layer_norm() if fused else norm),
            mlp=_mlp_spec(model, te, use_te=use_te, pg_collection=pg_collection),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=(
                {}
                if fused
                else {
                    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                    **({} if model.is_moe else {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}),
                }
            ),
        ),
    )


def block_spec(model: ModelConfig, *, num_layers: int, use_te: bool = False, pg_collection=None) -> TransformerBlockSubmodules:
    """`num_layers` OLMoE layers plus the final norm (this rank's pipeline chunk)."""
    final_norm = te_backend().layer_norm() if _te_fuses_norms(model, use_te=use_te) else block_norm(model.norm_type)
    layer = layer_spec(model, use_te=use_te, pg_collection=pg_collection)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=final_norm)


class _UnknownMlpTypeFilter(logging.Filter):
    """Drops megatron-core 0.16.1's "Unknown MLP type: ... Using default kwargs" for our MoE layer.

    Why a filter and not a fix: TransformerLayer recognises an MoE layer only when its spec's module
    is exactly MoELayer (`module in (MoELayer, ...)`), so every subclass warns, once per layer and
    build. OlmoeMoELayer has to be a subclass (it skips the identity sort around Megatron's own
    dispatcher), and the kwargs Megatron would have added (the process groups) are in its spec's
    params, so nothing is defaulted. Other MLP types still warn.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Unknown MLP type: ") and "ModuleSpec" in message)


_UNKNOWN_MLP_FILTER = _UnknownMlpTypeFilter()


def quiet_moe_subclass_warning() -> None:
    """Installs `_UnknownMlpTypeFilter` on Megatron's transformer-layer logger (idempotent)."""
    layer_logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    if _UNKNOWN_MLP_FILTER not in layer_logger.filters:
        layer_logger.addFilter(_UNKNOWN_MLP_FILTER)


def te_backend():
    """Transformer Engine's spec provider, or a clear error saying what is missing."""
    try:
        import transformer_engine  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            "precision.spec=te needs Transformer Engine: pip install 'olmoe-megatron[gpu]' on a machine "
            "with a CUDA build of torch (it cannot be installed on CPU-only machines, where "
            f"megatron-core then fails to import). Import error: {exc}"
        ) from None
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    return TESpecProvider()
