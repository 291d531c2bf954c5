"""The MoE kernels: SwiGLU with the router probabilities (bf16), expert row padding (any dtype),
the router's top-k mask (fp32) and the unpermute that sums each token's expert outputs (bf16).

Legend: T tokens, P padded rows, F expert FFN width, E experts, R routed rows, H hidden size.
"""

from __future__ import annotations

import torch

from olmoe_megatron.ops.cpu._args import check_integer, check_shape, check_tensor, fail, int64s, ptr
from olmoe_megatron.ops.cpu.loader import require_library

_BF16, _F32 = torch.bfloat16, torch.float32


# ----------------------------------------------------------------------------- SwiGLU with probabilities
def _check_fc1_out(kernel: str, fc1_out_P2F: torch.Tensor) -> None:
    check_tensor(kernel, "fc1_out_P2F", fc1_out_P2F, dtype=_BF16, dim=2)
    if fc1_out_P2F.shape[1] % 2:
        raise fail(kernel, "fc1_out_P2F", f"has shape {tuple(fc1_out_P2F.shape)}", "an even width ([gate | up])")


def swiglu_probs_forward(fc1_out_P2F: torch.Tensor, probs_P: torch.Tensor) -> torch.Tensor:
    """`bf16(bf16(silu(gate)) * up) * p` per row, rounded to bf16 (gate, up: the halves of fc1_out).

    Args:
        fc1_out_P2F: contiguous bf16 [P, 2F], each row [gate | up].
        probs_P: contiguous fp32 [P], each row's router probability.

    Raises:
        KernelArgumentError: either of another dtype, layout or shape.
    """
    kernel = "swiglu_probs_forward"
    _check_fc1_out(kernel, fc1_out_P2F)
    check_tensor(kernel, "probs_P", probs_P, dtype=_F32, dim=1)
    check_shape(kernel, "probs_P", probs_P, fc1_out_P2F.shape[:1], "one probability per row of fc1_out_P2F")
    rows, width = fc1_out_P2F.shape[0], fc1_out_P2F.shape[1] // 2
    scaled_PF = fc1_out_P2F.new_empty((rows, width))
    require_library(kernel).swiglu_probs_fwd_bf16(ptr(fc1_out_P2F), ptr(probs_P), ptr(scaled_PF), rows, width)
    return scaled_PF


def swiglu_probs_backward(grad_scaled_PF: torch.Tensor, fc1_out_P2F: torch.Tensor, probs_P: torch.Tensor):
    """(gradient of fc1_out in bf16 [P, 2F], gradient of the probabilities in fp32 [P]) of
    `swiglu_probs_forward`, from its contiguous bf16 output gradient [P, F].

    Raises:
        KernelArgumentError: a tensor of another dtype, layout or shape.
    """
    kernel = "swiglu_probs_backward"
    check_tensor(kernel, "grad_scaled_PF", grad_scaled_PF, dtype=_BF16, dim=2)
    _check_fc1_out(kernel, fc1_out_P2F)
    rows, width = grad_scaled_PF.shape
    check_shape(kernel, "fc1_out_P2F", fc1_out_P2F, (rows, 2 * width), "[P, 2F] for grad_scaled_PF [P, F]")
    check_tensor(kernel, "probs_P", probs_P, dtype=_F32, dim=1)
    check_shape(kernel, "probs_P", probs_P, (rows,), "one probability per row of grad_scaled_PF")
    grad_fc1_out_P2F = torch.empty_like(fc1_out_P2F)
    grad_probs_P = torch.empty(rows, dtype=_F32)
    require_library(kernel).swiglu_probs_bwd_bf16(ptr(grad_scaled_PF), ptr(fc1_out_P2F), ptr(probs_P),
                                                  ptr(grad_fc1_out_P2F), ptr(grad_probs_P), rows, width)
    return grad_fc1_out_P2F, grad_probs_P


# ----------------------------------------------------------------------------- expert row padding
def _check_layout(kernel: str, counts: list[int], padded: list[int]) -> None:
    if len(counts) != len(padded):
        raise fail(kernel, "counts/padded", f"have {len(counts)} and {len(padded)} entries", "one entry per expert in each")
    if not all(0 <= c <= p for c, p in zip(counts, padded)):
        bad = next(e for e, (c, p) in enumerate(zip(counts, padded)) if not 0 <= c <= p)
        raise fail(kernel, "counts/padded", f"give expert {bad} {counts[bad]} rows padded to {padded[bad]}",
                   "0 <= counts[e] <= padded[e]")


def pad_rows(rows_TX: torch.Tensor, counts: list[int], padded: list[int]) -> torch.Tensor:
    """Rows grouped by expert ([T, ...], `counts[e]` each, any dtype and layout) into `padded[e]` rows
    per expert, the extra rows zero: `experts._scatter_rows` for this layout, each row written once.

    Raises:
        KernelArgumentError: rows not on CPU, counts that do not sum to T, or padded[e] < counts[e].
    """
    return _move_rows("pad_rows", "rows_TX", rows_TX, counts, padded, unpad=False)


def unpad_rows(rows_PX: torch.Tensor, counts: list[int], padded: list[int]) -> torch.Tensor:
    """The inverse of `pad_rows`: each expert's first `counts[e]` rows.

    Raises:
        KernelArgumentError: rows not on CPU, padded counts that do not sum to P, or padded[e] < counts[e].
    """
    return _move_rows("unpad_rows", "rows_PX", rows_PX, counts, padded, unpad=True)


def _move_rows(kernel: str, name: str, src: torch.Tensor, counts: list[int], padded: list[int], *,
               unpad: bool) -> torch.Tensor:
    """pad_rows / unpad_rows: checks, then one C call from `src` ([sum(counts) or sum(padded), ...])
    into a new tensor of the other row count."""
    check_tensor(kernel, name, src, dtype=None, min_dim=1, contiguous=False)
    _check_layout(kernel, counts, padded)
    have, want = (padded, counts) if unpad else (counts, padded)
    if sum(have) != src.shape[0]:
        field, verb = ("padded", "sums to") if unpad else ("counts", "sum to")
        raise fail(kernel, field, f"{verb} {sum(have)}", f"the {src.shape[0]} rows of {name}")
    src = src.contiguous()
    out = src.new_empty((sum(want), *src.shape[1:]))
    _pad_call(kernel, src, out, counts, padded, unpad=unpad)
    return out


def _pad_call(kernel: str, src: torch.Tensor, dst: torch.Tensor, counts: list[int], padded: list[int], *,
              unpad: bool) -> None:
    row_bytes = src[0].numel() * src.element_size() if src.shape[0] else 0
    require_library(kernel).pad_rows(ptr(src), ptr(dst), int64s(counts), int64s(padded), len(counts), row_bytes,
                                     int(unpad))


# ----------------------------------------------------------------------------- router top-k
def topk_mask(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean [T, E]: each row's k largest fp32 scores (ties to the lower index; NaN counts as
    largest). Any layout (copied to contiguous).

    Raises:
        KernelArgumentError: scores not fp32 [T, E] on CPU, or k outside 1..E.
    """
    kernel = "topk_mask"
    check_tensor(kernel, "scores_TE", scores_TE, dtype=_F32, dim=2, contiguous=False)
    rows, width = scores_TE.shape
    if not 1 <= k <= width:
        raise fail(kernel, "k", f"is {k}", f"1 <= k <= {width} (the experts in scores_TE)")
    scores_TE = scores_TE.contiguous()
    mask_TE = torch.empty(scores_TE.shape, dtype=torch.bool)
    require_library(kernel).topk_mask_f32(ptr(scores_TE), ptr(mask_TE), rows, width, k)
    return mask_TE


# ----------------------------------------------------------------------------- MoE unpermute
class _CombineRows(torch.autograd.Function):
    """out[t] = sum of rows_RH[r] over r with token_R[r] == t (Megatron's unpermute without probs)."""

    @staticmethod
    def forward(ctx, rows_RH: torch.Tensor, token_R: torch.Tensor, num_tokens: int) -> torch.Tensor:
        rows_RH = rows_RH.contiguous()
        token_R = token_R.to(torch.int64).contiguous()
        out_TH = rows_RH.new_empty((num_tokens, rows_RH.shape[1]))
        require_library("combine_rows").combine_rows_bf16(ptr(rows_RH), ptr(token_R), ptr(out_TH), rows_RH.shape[0],
                                                          num_tokens, rows_RH.shape[1])
        ctx.save_for_backward(token_R)
        return out_TH

    @staticmethod
    def backward(ctx, grad_TH: torch.Tensor):
        (token_R,) = ctx.saved_tensors
        return grad_TH.index_select(0, token_R), None, None  # scatter_add's gradient: a gather


def combine_rows(rows_RH: torch.Tensor, token_R: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Sums bf16 rows into their tokens' rows ([R, H] -> [num_tokens, H], fp32 sums, one rounding).

    `token_R` holds each row's token, in [0, num_tokens): its values are not checked here (that
    would be a pass over the indices on every call); Megatron's permutation produces them.

    Raises:
        KernelArgumentError: rows not bf16 [R, H] on CPU, token_R not an integer [R] tensor, or a
            negative num_tokens.
    """
    kernel = "combine_rows"
    check_tensor(kernel, "rows_RH", rows_RH, dtype=_BF16, dim=2, contiguous=False)
    check_integer(kernel, "token_R", token_R)
    check_shape(kernel, "token_R", token_R, rows_RH.shape[:1], "one token per row of rows_RH")
    if num_tokens < 0:
        raise fail(kernel, "num_tokens", f"is {num_tokens}", "a count >= 0")
    return _CombineRows.apply(rows_RH, token_R, num_tokens)
