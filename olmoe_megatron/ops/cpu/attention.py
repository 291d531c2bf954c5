"""The explicit-scores attention's kernels (bf16): the masked softmax and its backward, fp32
operands widened from strided bf16 views, and the flash row term rowsum(dO * O).

Legend: B = batch * heads independent problems, q / k query / key positions, s positions, d head dim.
"""

from __future__ import annotations

import torch

from olmoe_megatron.ops.cpu._args import check_shape, check_tensor, ptr
from olmoe_megatron.ops.cpu.loader import require_library

_BF16, _F32 = torch.bfloat16, torch.float32


def attention_softmax_forward(scores_Bqk: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """bf16 softmax over the last dimension of contiguous fp32 scores [B, s_q, s_k]; `causal` zeroes
    the keys after each query (query i sees keys up to i + s_k - s_q) without a mask tensor.

    Raises:
        KernelArgumentError: scores not contiguous fp32 [B, s_q, s_k] on CPU.
    """
    kernel = "attention_softmax_forward"
    check_tensor(kernel, "scores_Bqk", scores_Bqk, dtype=_F32, dim=3)
    blocks, s_q, s_k = scores_Bqk.shape
    probs_Bqk = torch.empty(scores_Bqk.shape, dtype=_BF16)
    require_library(kernel).softmax_fwd_f32_bf16(ptr(scores_Bqk), ptr(probs_Bqk), blocks, s_q, s_k, int(causal))
    return probs_Bqk


def attention_softmax_backward(grad_probs_Bqk: torch.Tensor, probs_Bqk: torch.Tensor, row_Bq1: torch.Tensor) -> torch.Tensor:
    """bf16 gradient of the scores, `P * (dP - row)`, with row = rowsum(dO * O) per query (fp32).

    Args:
        grad_probs_Bqk: dP, contiguous fp32 [B, s_q, s_k].
        probs_Bqk: P, contiguous bf16 [B, s_q, s_k] (`attention_softmax_forward`'s result).
        row_Bq1: contiguous fp32 [B, s_q, 1].

    Raises:
        KernelArgumentError: any of these of another dtype, layout or shape.
    """
    kernel = "attention_softmax_backward"
    check_tensor(kernel, "grad_probs_Bqk", grad_probs_Bqk, dtype=_F32, dim=3)
    check_tensor(kernel, "probs_Bqk", probs_Bqk, dtype=_BF16, dim=3)
    check_shape(kernel, "probs_Bqk", probs_Bqk, grad_probs_Bqk.shape, "grad_probs_Bqk's shape")
    check_tensor(kernel, "row_Bq1", row_Bq1, dtype=_F32)
    check_shape(kernel, "row_Bq1", row_Bq1, (*probs_Bqk.shape[:2], 1), "[B, s_q, 1] of probs_Bqk")
    grad_scores_Bqk = torch.empty_like(probs_Bqk)
    s_k = probs_Bqk.shape[-1]
    require_library(kernel).softmax_bwd_bf16(ptr(grad_probs_Bqk), ptr(probs_Bqk), ptr(row_Bq1), ptr(grad_scores_Bqk),
                                             probs_Bqk.numel() // s_k if s_k else 0, s_k)
    return grad_scores_Bqk


def widen_bsd(x_Bsd: torch.Tensor, scale: float = 1.0) -> torch.Tensor | None:
    """Contiguous fp32 copy of bf16 [B, s, d] times `scale`, read from any strides with a unit-stride
    head dim.

    Returns:
        The copy, or None where the head dim is not unit-stride (the caller then uses torch's cast).

    Raises:
        KernelArgumentError: x not bf16 [B, s, d] on CPU.
    """
    kernel = "widen_bsd"
    check_tensor(kernel, "x_Bsd", x_Bsd, dtype=_BF16, dim=3, contiguous=False)
    if x_Bsd.stride(2) != 1:
        return None
    blocks, seq, dim = x_Bsd.shape
    y = torch.empty((blocks, seq, dim), dtype=_F32)
    require_library(kernel).bf16_to_f32_bsd(ptr(x_Bsd), ptr(y), blocks, seq, dim, x_Bsd.stride(0), x_Bsd.stride(1),
                                            scale)
    return y


def row_dot_bsd(a_Bsd: torch.Tensor, b_Bsd: torch.Tensor) -> torch.Tensor | None:
    """rowsum(a * b) over the head dim of two bf16 [B, s, d] tensors (any strides with a unit-stride
    head dim), fp32 [B, s, 1].

    Returns:
        The row sums, or None where a head dim is not unit-stride (the caller then uses torch).

    Raises:
        KernelArgumentError: a or b not bf16 [B, s, d] on CPU, or of different shapes.
    """
    kernel = "row_dot_bsd"
    check_tensor(kernel, "a_Bsd", a_Bsd, dtype=_BF16, dim=3, contiguous=False)
    check_tensor(kernel, "b_Bsd", b_Bsd, dtype=_BF16, dim=3, contiguous=False)
    check_shape(kernel, "b_Bsd", b_Bsd, a_Bsd.shape, "a_Bsd's shape")
    if a_Bsd.stride(2) != 1 or b_Bsd.stride(2) != 1:
        return None
    blocks, seq, dim = a_Bsd.shape
    out = torch.empty((blocks, seq, 1), dtype=_F32)
    require_library(kernel).row_dot_bf16(ptr(a_Bsd), ptr(b_Bsd), ptr(out), blocks, seq, dim,
                                         a_Bsd.stride(0), a_Bsd.stride(1), b_Bsd.stride(0), b_Bsd.stride(1))
    return out
