"""Per-rank memory estimate for a run, computed from the configs alone (no model is built).

Weights, gradients and optimizer state are exact counts of this rank's parameters times their
bytes; activations are an estimate (documented per term) for the busiest pipeline stage.
"""

from __future__ import annotations

import dataclasses

from olmoe_megatron.model.config import ModelConfig
from olmoe_megatron.model.precision import PrecisionConfig
from olmoe_megatron.parallel.layout import ParallelLayout


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    dense_params: int
    expert_params: int
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes

    def table(self) -> list[tuple[str, str]]:
        gib = lambda b: f"{b / 2**30:8.2f} GiB"  # noqa: E731
        return [
            ("parameters (dense part, this rank)", f"{self.dense_params / 1e6:10.2f} M"),
            ("parameters (experts, this rank)", f"{self.expert_params / 1e6:10.2f} M"),
            ("weights", gib(self.weights_bytes)),
            ("gradients", gib(self.grads_bytes)),
            ("optimizer state", gib(self.optimizer_bytes)),
            ("activations (estimate)", gib(self.activations_bytes)),
            ("total", gib(self.total_bytes)),
        ]


def estimate_memory(
    model: ModelConfig,
    layout: ParallelLayout,
    precision: PrecisionConfig,
    *,
    world_size: int,
    seq_length: int,
    micro_batch_size: int,
    distributed_optimizer: bool,
    recompute: str | None = None,
) -> MemoryEstimate:
    """Memory of the busiest rank (first pipeline stage: embedding + in-flight micro-batches)."""
    tp, pp, ep, etp = layout.tp, layout.pp, layout.ep, layout.etp
    layers = model.num_layers // pp
    dense_per_layer = model.attention_params_per_layer() // tp + 2 * model.d_model
    router = model.d_model * model.num_experts if model.is_moe else 0
    shared = model.num_shared_experts * model.expert_params() // tp
    dense_mlp = 0 if model.is_moe else 3 * model.d_model * model.dense_ffn_hidden_size // tp
    embedding = model.padded_vocab_size * model.d_model // tp
    head = embedding if pp == 1 else 0  # the output layer sits on the last stage
    dense = layers * (dense_per_layer + router + shared + dense_mlp) + embedding + head + model.d_model
    experts = layers * (model.num_experts // ep) * model.expert_params() // etp if model.is_moe else 0
    params = dense + experts
    param_bytes = 2 if precision.dtype == "bf16" else 4
    grad_bytes = 4 if precision.grad_reduce_in_fp32 or precision.dtype == "fp32" else 2
    # Adam moments (fp32) plus fp32 master weights when the model runs in bf16.
    state_bytes = 8 + (4 if precision.dtype == "bf16" else 0)
    dp = layout.data_parallel_size(world_size)
    edp = layout.expert_data_parallel_size(world_size)
    if distributed_optimizer:
        optimizer = state_bytes * (dense / dp + experts / edp)
    else:
        optimizer = state_bytes * params
    activations = _activation_bytes(model, layout, seq_length=seq_length, micro_batch_size=micro_batch_size,
                                    layers=layers, param_bytes=param_bytes, recompute=recompute)
    return MemoryEstimate(
        dense_params=int(dense),
        expert_params=int(experts),
        weights_bytes=int(params * param_bytes),
        grads_bytes=int(params * grad_bytes),
        optimizer_bytes=int(optimizer),
        activations_bytes=int(activations),
    )


def _activation_bytes(model, layout, *, seq_length, micro_batch_size, layers, param_bytes, recompute) -> float:
    """Stored activations per layer and micro-batch, times layers and in-flight micro-batches.

    Per token (elements): attention keeps its input, q/k/v, normed q/k, the context and the
    output projection input (~8 d); the MoE keeps its input, router logits, and for each of the
    top_k copies the permuted input, fc1 output (2F) and activation (F) (~top_k * (d + 3F)).
    Attention scores are not stored (flash/fused attention). Sequence parallelism divides by TP.
    """
    tokens = seq_length * micro_batch_size / layout.cp
    tp = layout.tp
    attention = 8 * model.d_model / (tp if layout.sequence_parallel else 1) + 8 * model.d_model / tp
    if model.is_moe:
        mlp = model.d_model + model.num_experts + model.top_k * (model.d_model + 3 * model.expert_ffn_hidden_size / layout.etp)
    else:
        mlp = model.d_model + 3 * model.dense_ffn_hidden_size / tp
    per_layer = tokens * (attention + mlp) * param_bytes
    if recompute == "full":
        per_layer = tokens * model.d_model * param_bytes  # only layer inputs are kept
    in_flight = layout.pp if layout.pp > 1 else 1  # 1F1B: the first stage holds pp micro-batches
    logits = tokens * model.padded_vocab_size / tp * 4 if layout.pp == 1 else 0
    return per_layer * layers * in_flight + logits
