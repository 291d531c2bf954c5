"""Builds this rank's OLMoE model chunks (one per virtual pipeline stage) on Megatron-Core's GPTModel."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from olmoe_megatron.model.config import ModelConfig
from olmoe_megatron.model.megatron_config import to_transformer_config
from olmoe_megatron.model.precision import PrecisionConfig
from olmoe_megatron.model.rope import install_cpu_rope
from olmoe_megatron.model.spec import block_spec, quiet_moe_subclass_warning
from olmoe_megatron.ops.cpu import kernels_apply, vocab_parallel_cross_entropy_bf16
from olmoe_megatron.parallel.context import ParallelContext


class OlmoeGPTModel(GPTModel):
    """Megatron's GPTModel; bf16 logits on CPU take the fused cross-entropy kernel.

    The loss is Megatron's vocab-parallel cross-entropy either way (same all-reduces over the
    TP group); the kernel only avoids the fp32 copy of the logits (`olmoe_megatron.ops.cpu`).
    """

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.config.cross_entropy_loss_fusion or not kernels_apply(logits):
            return super().compute_language_model_loss(labels, logits)
        tp = self.pg_collection.tp
        vocab_start = dist.get_rank(tp) * logits.shape[-1] if tp is not None else 0
        loss_sb = vocab_parallel_cross_entropy_bf16(
            logits, labels.transpose(0, 1).contiguous(), group=tp, vocab_start=vocab_start
        )
        return loss_sb.transpose(0, 1).contiguous()


def build_transformer_config(
    model: ModelConfig, context: ParallelContext, *, precision: PrecisionConfig, recompute: str | None = None
) -> tuple[TransformerConfig, bool]:
    """(TransformerConfig, use_te) for this context."""
    use_te = precision.use_te()
    # On CPU our RoPE kernel goes into Megatron's fused-RoPE slot (TE's on GPUs; empty without TE).
    cpu_rope = not context.uses_cuda and install_cpu_rope()
    config = to_transformer_config(
        model, context.layout, precision=precision, backend=context.backend, use_te=use_te, recompute=recompute,
        cpu_rope=cpu_rope,
    )
    return config, use_te


def build_model_chunks(
    model: ModelConfig,
    context: ParallelContext,
    *,
    precision: PrecisionConfig,
    config: TransformerConfig | None = None,
    recompute: str | None = None,
) -> list[GPTModel]:
    """This rank's model chunks: one, or `vpp` of them for an interleaved pipeline.

    Args:
        model: the architecture.
        context: process groups and ranks (from `olmoe_megatron.parallel.initialize`).
        precision: dtype and module backend.
        config: a TransformerConfig to reuse (built from the three above when None).
        recompute: activation recompute (None, 'selective', 'full').
    """
    use_te = precision.use_te()
    if config is None:
        config, use_te = build_transformer_config(model, context, precision=precision, recompute=recompute)
    quiet_moe_subclass_warning()
    num_chunks = context.layout.vpp or 1
    chunks = []
    for chunk in range(num_chunks):
        vp_stage = chunk if context.layout.vpp else None
        pre = context.is_first_stage and chunk == 0
        post = context.is_last_stage and chunk == num_chunks - 1
        num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=context.pp_rank)
        chunks.append(
            OlmoeGPTModel(
                config=config,
                transformer_layer_spec=block_spec(model, num_layers=num_layers, use_te=use_te,
                                                  pg_collection=context.groups),
                vocab_size=model.padded_vocab_size,
                max_sequence_length=model.max_sequence_length,
                pre_process=pre,
                post_process=post,
                parallel_output=True,
                share_embeddings_and_output_weights=False,
                position_embedding_type="rope",
                rotary_percent=1.0,
                rotary_base=int(model.rope_theta) if float(model.rope_theta).is_integer() else model.rope_theta,
                vp_stage=vp_stage,
                pg_collection=context.groups,
            )
        )
    return chunks
