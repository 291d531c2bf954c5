"""Fused bf16 CPU kernels, compiled from `kernels.c` at first use and called through ctypes.

Why: on CPU, each torch operator is a separate pass over memory plus ~10-20 us of dispatch, and
many of torch's elementwise and reduction kernels run far below the memory bandwidth at the
sizes of a training step (a bf16->fp32 RMSNorm is seven operators forward and a dozen backward).
One fused pass per function removes most of that. GPUs keep their own fused paths (Transformer
Engine, apex); fp32 keeps the torch code bit for bit (golden runs and the Megatron reference).

This package owns everything about them:

- `kernels.c`: the C source; `loader`: the build, its cache (`loader.cache_dir()`) and loading.
- The one decision: `kernels_apply(*tensors)` (CPU, bf16 unless told otherwise, contiguous unless
  told otherwise, and `enabled()`: built and not switched off by `OLMOE_CPU_KERNELS=0`). Call
  sites ask it, or call a wrapper whose documented fallback is None / False.
- The typed wrappers, by user: `layers` (RMSNorm, cross-entropy, RoPE), `attention` (the
  explicit-scores attention's softmax and operands), `moe` (SwiGLU with probabilities, expert row
  padding, top-k mask, unpermute), `optim` (gradient accumulation, AdamW, the gradient norm).
  Each checks dtype, device, layout and shapes first and raises `KernelArgumentError` (a
  ValueError naming the kernel, the argument, what it got and what it needs): a wrong tensor
  never reaches C as a raw pointer. Calling one while the kernels are off raises
  `KernelsUnavailableError`.
"""

from olmoe_megatron.ops.cpu._args import KernelArgumentError
from olmoe_megatron.ops.cpu.attention import (
    attention_softmax_backward,
    attention_softmax_forward,
    row_dot_bsd,
    widen_bsd,
)
from olmoe_megatron.ops.cpu.layers import rms_norm_bf16, rope_bf16, vocab_parallel_cross_entropy_bf16
from olmoe_megatron.ops.cpu.loader import KernelsUnavailableError, enabled, kernels_apply
from olmoe_megatron.ops.cpu.moe import combine_rows, pad_rows, swiglu_probs_backward, swiglu_probs_forward, topk_mask, unpad_rows
from olmoe_megatron.ops.cpu.optim import accumulate_into_main_grads, adamw_step, l2_norm, sum_of_squares

__all__ = [
    "KernelArgumentError",
    "KernelsUnavailableError",
    "accumulate_into_main_grads",
    "adamw_step",
    "attention_softmax_backward",
    "attention_softmax_forward",
    "combine_rows",
    "enabled",
    "kernels_apply",
    "l2_norm",
    "pad_rows",
    "rms_norm_bf16",
    "rope_bf16",
    "row_dot_bsd",
    "sum_of_squares",
    "swiglu_probs_backward",
    "swiglu_probs_forward",
    "topk_mask",
    "unpad_rows",
    "vocab_parallel_cross_entropy_bf16",
    "widen_bsd",
]
