"""The layer kernels: RMSNorm, the vocabulary-parallel cross-entropy and rotary embeddings (bf16).

Each wrapper checks its arguments (`_args`) and raises KernelArgumentError before any pointer
reaches C; whether to call it at all is `kernels_apply(...)`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from olmoe_megatron.ops.cpu._args import check_integer, check_shape, check_tensor, fail, ptr
from olmoe_megatron.ops.cpu.loader import require_library

_BF16, _F32 = torch.bfloat16, torch.float32


# ----------------------------------------------------------------------------- RMSNorm
class _RMSNormBF16(torch.autograd.Function):
    """`w * bf16(x / sqrt(mean(x^2) + eps))` over the last dimension, bf16 in and out."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        width = x.shape[-1]
        rows = x.numel() // width
        y = torch.empty_like(x)
        rstd = torch.empty(rows, dtype=_F32)
        require_library("rms_norm_bf16").rmsnorm_fwd_bf16(ptr(x), ptr(weight), ptr(y), ptr(rstd), rows, width, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dy = dy.to(x.dtype).contiguous()
        width = x.shape[-1]
        dx = torch.empty_like(x)
        dw = torch.empty(width, dtype=_F32)
        require_library("rms_norm_bf16").rmsnorm_bwd_bf16(ptr(dy), ptr(x), ptr(weight), ptr(rstd), ptr(dx), ptr(dw),
                                                          x.numel() // width, width)
        return dx, dw.to(weight.dtype), None


def rms_norm_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The fused RMSNorm of contiguous bf16 `x` [..., width] with bf16 `weight` [width].

    Raises:
        KernelArgumentError: a tensor of another dtype, device, layout or width.
    """
    kernel = "rms_norm_bf16"
    check_tensor(kernel, "x", x, dtype=_BF16, min_dim=1)
    check_tensor(kernel, "weight", weight, dtype=_BF16, dim=1)
    if x.shape[-1] == 0:
        raise fail(kernel, "x", f"has shape {tuple(x.shape)}", "a last dimension of at least 1")
    check_shape(kernel, "weight", weight, (x.shape[-1],), "x's last dimension")
    return _RMSNormBF16.apply(x, weight, eps)


# ----------------------------------------------------------------------------- cross-entropy
class _VocabParallelCrossEntropyBF16(torch.autograd.Function):
    """Megatron's vocab-parallel cross-entropy on bf16 logits [s, b, V/tp], loss [s, b] in fp32.

    Same function as megatron.core.tensor_parallel.vocab_parallel_cross_entropy (no label
    smoothing), same all-reduces over the TP group (max, then target logit and sum of exps), but
    the logits stay bf16: no fp32 copy, no saved fp32 softmax (backward recomputes exp from the
    bf16 logits), and the gradient is written in bf16 directly.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group, vocab_start: int) -> torch.Tensor:
        vocab = logits.shape[-1]
        rows = logits.numel() // vocab
        target_flat = target.reshape(-1).to(torch.int64).contiguous()
        lib = require_library("vocab_parallel_cross_entropy_bf16")
        row_max = torch.empty(rows, dtype=_F32)
        lib.ce_max_bf16(ptr(logits), ptr(row_max), rows, vocab)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        sum_exp = torch.empty(rows, dtype=_F32)
        predicted = torch.empty(rows, dtype=_F32)
        lib.ce_sum_exp_bf16(ptr(logits), ptr(row_max), ptr(target_flat), ptr(sum_exp), ptr(predicted),
                            rows, vocab, vocab_start)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(predicted, group=group)
            dist.all_reduce(sum_exp, group=group)
        ctx.save_for_backward(logits, row_max, sum_exp, target_flat)
        ctx.vocab_start = vocab_start
        return (torch.log(sum_exp) - predicted).view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, row_max, sum_exp, target_flat = ctx.saved_tensors
        vocab = logits.shape[-1]
        grad_flat = grad_loss.reshape(-1).float().contiguous()
        grad_logits = torch.empty_like(logits)
        require_library("vocab_parallel_cross_entropy_bf16").ce_grad_bf16(
            ptr(logits), ptr(row_max), ptr(sum_exp), ptr(target_flat), ptr(grad_flat), ptr(grad_logits),
            logits.numel() // vocab, vocab, ctx.vocab_start)
        return grad_logits, None, None, None


def vocab_parallel_cross_entropy_bf16(logits: torch.Tensor, target: torch.Tensor, *, group=None,
                                      vocab_start: int = 0) -> torch.Tensor:
    """Per-token fp32 loss of contiguous bf16 `logits` [..., V_local] (this rank's vocabulary slice,
    from `vocab_start`) against integer `target` [...] (global vocabulary ids; ids outside this
    rank's slice count as on another rank).

    Raises:
        KernelArgumentError: logits not contiguous bf16 on CPU, a non-integer target, or a target
            whose shape is not the logits' without the vocabulary dimension.
    """
    kernel = "vocab_parallel_cross_entropy_bf16"
    check_tensor(kernel, "logits", logits, dtype=_BF16, min_dim=1)
    if logits.shape[-1] == 0:
        raise fail(kernel, "logits", f"has shape {tuple(logits.shape)}", "a vocabulary dimension of at least 1")
    check_integer(kernel, "target", target)
    check_shape(kernel, "target", target, logits.shape[:-1], "the logits' shape without the vocabulary dimension")
    if vocab_start < 0:
        raise fail(kernel, "vocab_start", f"is {vocab_start}", "a non-negative offset")
    return _VocabParallelCrossEntropyBF16.apply(logits, target, group, vocab_start)


# ----------------------------------------------------------------------------- rotary embedding
def _rope(x: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor, backward: bool) -> torch.Tensor:
    seq, dim = x.shape[0], x.shape[-1]
    y = torch.empty_like(x)
    require_library("rope_bf16").rope_bf16(ptr(x), ptr(cos_SD), ptr(sin_SD), ptr(y), seq, x.numel() // (seq * dim),
                                           dim, int(backward))
    return y


class _RopeBF16(torch.autograd.Function):
    """Megatron's unfused rotate-half RoPE on bf16 [s, ..., d] with bf16 cos/sin tables [s, d]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos_SD, sin_SD)
        return _rope(x, cos_SD, sin_SD, backward=False)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        cos_SD, sin_SD = ctx.saved_tensors
        return _rope(grad_y.to(_BF16).contiguous(), cos_SD, sin_SD, backward=True), None, None


def rope_bf16(x: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    """RoPE of contiguous bf16 `x` [s, ..., d] (rotate-half layout, the whole head dim rotated) with
    bf16 cos/sin tables [s, d] (any layout: copied to contiguous).

    Raises:
        KernelArgumentError: x not contiguous bf16 on CPU, an odd or empty head dim, or tables of
            another dtype or shape.
    """
    kernel = "rope_bf16"
    check_tensor(kernel, "x", x, dtype=_BF16, min_dim=2)
    if x.shape[-1] == 0 or x.shape[-1] % 2:
        raise fail(kernel, "x", f"has head dim {x.shape[-1]}", "an even head dim of at least 2 (rotate-half)")
    for name, table in (("cos_SD", cos_SD), ("sin_SD", sin_SD)):
        check_tensor(kernel, name, table, dtype=_BF16, contiguous=False)
        check_shape(kernel, name, table, (x.shape[0], x.shape[-1]), "[x's sequence length, x's head dim]")
    return _RopeBF16.apply(x, cos_SD.contiguous(), sin_SD.contiguous())
