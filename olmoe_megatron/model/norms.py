"""RMSNorm (and, for the paper's norm ablation, LayerNorm) modules for the OLMoE spec.

`RMSNorm` computes in fp32 and casts back before the weight multiply, as OLMoE (and HF's
OlmoeRMSNorm) do; its weight carries `sequence_parallel` so that Megatron all-reduces its
gradient over the TP group under sequence parallelism (Megatron's WrappedTorchNorm refuses SP).

`FullWidthQKNorm` is OLMoE's QK-norm: one RMSNorm over the whole q (or k) projection, 2048 wide
in OLMoE-1B-7B, applied before the head split. Megatron's qk_layernorm normalises each 128-wide
head: a different function and a different checkpoint shape. Under tensor parallelism each rank
holds a slice of the heads, so the sum of squares is all-reduced over the TP group and the weight
is sharded like the projection's columns.

On GPUs (bf16/fp16 inputs) both run `_LeanRMSNorm`, an autograd function that keeps for backward
the input in its own dtype (2 bytes an element) and the fp32 reciprocal RMS per row, where autograd
over the fp32 graph keeps an fp32 copy of the input (QK-norm: two, one per fp32 cast) plus the
normalised bf16 tensor: 6 bytes an element (QK-norm 10) against 2 (tests/model/test_norms.py counts
them). CPU runs keep their paths (the C kernel in bf16; fp32 is the reference whose bits the golden
losses pin).

`LayerNorm` and `FullWidthQKNorm(norm_type="layernorm")` are ModelConfig.norm_type='layernorm': OLMo's
LayerNorm as OLMoE's configs set it (a learnable scale, no bias), computed in fp32 and cast back
before the scale like RMSNorm; the QK variant removes the mean and variance of the full width (under
TP both sums are all-reduced). They have no fused kernels: an ablation, not a production path.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from olmoe_megatron.ops.cpu import kernels_apply, rms_norm_bf16


class _LeanRMSNorm(torch.autograd.Function):
    """`weight * bf16(x * rstd)`, rstd = (sum(x^2) / width + eps)^-1/2 over the last dimension in fp32,
    the sum all-reduced over `group` when the width is split over it (full-width QK-norm under TP).

    Saves x (its own dtype), the weight and rstd [rows, 1] (fp32); backward recomputes x * rstd.
    Forward is the same arithmetic as the fp32-graph path; backward differs only in the order of
    fp32 sums.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, group, width: int) -> torch.Tensor:
        x32 = x.float()
        if group is None:
            mean_square = x32.pow(2).mean(-1, keepdim=True)
        else:
            square_sum = x32.pow(2).sum(-1, keepdim=True)
            dist.all_reduce(square_sum, group=group)
            mean_square = square_sum / width
        rstd = torch.rsqrt(mean_square + eps)
        normalized = (x32 * rstd).to(x.dtype)
        del x32
        ctx.save_for_backward(x, weight, rstd)
        ctx.group, ctx.width = group, width
        return weight * normalized

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        grad_y = grad_y.to(x.dtype)
        x32 = x.float()
        normalized = (x32 * rstd).to(x.dtype)
        grad_weight = (grad_y * normalized).float().reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_normalized32 = (grad_y * weight).float()
        row = (grad_normalized32 * x32).sum(-1, keepdim=True)
        if ctx.group is not None:
            dist.all_reduce(row, group=ctx.group)
        grad_x = rstd * grad_normalized32 - x32 * (rstd.pow(3) * row / ctx.width)
        return grad_x.to(x.dtype), grad_weight, None, None, None


def lean_norm_applies(x: torch.Tensor) -> bool:
    """The GPU path: half-precision inputs on CUDA (module doc)."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def lean_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, group=None, width: int | None = None) -> torch.Tensor:
    """`_LeanRMSNorm` of x over its last dimension (of global width `width` when split over `group`)."""
    return _LeanRMSNorm.apply(x, weight, eps, group, width if width is not None else x.shape[-1])


def rms_normalize(x: torch.Tensor, weight: torch.Tensor, eps: float, *, mean_square: torch.Tensor | None = None) -> torch.Tensor:
    """`weight * (x / sqrt(mean(x^2) + eps))`, computed in fp32, cast back before the weight.

    bf16 on CPU runs the fused kernel (one pass forward, one backward) where it is built.
    """
    if mean_square is None and kernels_apply(x, weight):
        return rms_norm_bf16(x, weight, eps)
    if mean_square is None and lean_norm_applies(x):
        return lean_rms_norm(x, weight, eps)
    x32 = x.float()
    if mean_square is None:
        mean_square = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(mean_square + eps)).to(x.dtype)


class _ScaledNorm(torch.nn.Module):
    """A norm over the last dimension with a learnable scale (ones) and no bias; with and without
    sequence parallelism (the weight is marked for Megatron's SP gradient all-reduce)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)


class RMSNorm(_ScaledNorm):
    """RMSNorm with a learnable scale; works with and without sequence parallelism."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_normalize(x, self.weight, self.eps)


def layer_normalize(x: torch.Tensor, weight: torch.Tensor, eps: float, *, group=None, width: int | None = None) -> torch.Tensor:
    """`weight * ((x - mean) / sqrt(var + eps))` over the last dimension, in fp32, cast back before the
    weight; with `group`, x is a slice of a row of global width `width` split over that group."""
    x32 = x.float()
    if group is None:
        return weight * F.layer_norm(x32, (x.shape[-1],), None, None, eps).to(x.dtype)
    mean = _AllReduceBothWays.apply(x32.sum(-1, keepdim=True), group) / width
    centered = x32 - mean
    variance = _AllReduceBothWays.apply(centered.pow(2).sum(-1, keepdim=True), group) / width
    return weight * (centered * torch.rsqrt(variance + eps)).to(x.dtype)


class LayerNorm(_ScaledNorm):
    """LayerNorm with a learnable scale and no bias (OLMo's, as OLMoE's configs set it); `RMSNorm`'s
    interface, with and without sequence parallelism."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_normalize(x, self.weight, self.eps)


def block_norm(norm_type: Literal["rmsnorm", "layernorm"]) -> type[torch.nn.Module]:
    """The module of the block and final norms for ModelConfig.norm_type."""
    return RMSNorm if norm_type == "rmsnorm" else LayerNorm


class _AllReduceBothWays(torch.autograd.Function):
    """Sum over a group in forward and in backward.

    Every rank uses the reduced value for its own heads only, so each rank's gradient of the sum
    is partial; the true gradient of every addend is the sum of those partials.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class FullWidthQKNorm(torch.nn.Module):
    """OLMoE's QK-norm over the full projection width; input and output `[s, b, heads, head_dim]`.

    norm_type 'rmsnorm' (OLMoE) or 'layernorm' (the norm ablation: `layer_normalize` of the full width).
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        *,
        projection: Literal["query", "key"],
        norm_type: Literal["rmsnorm", "layernorm"] = "rmsnorm",
    ):
        super().__init__()
        self.norm_type = norm_type
        tp = config.tensor_model_parallel_size
        heads = config.num_attention_heads if projection == "query" else config.num_query_groups
        self.eps = eps
        self.full_width = heads * hidden_size
        self.local_width = self.full_width // tp
        self.tp_size = tp
        self.weight = torch.nn.Parameter(torch.ones(self.local_width, dtype=config.params_dtype))
        # A TP-sharded parameter: counted once per shard in the grad norm, never TP-all-reduced.
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)
        setattr(self.weight, "sequence_parallel", False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, b, heads, head_dim = x.shape
        flat = x.reshape(s, b, heads * head_dim)
        if self.norm_type == "layernorm":
            group = parallel_state.get_tensor_model_parallel_group() if self.tp_size > 1 else None
            return layer_normalize(flat, self.weight, self.eps, group=group, width=self.full_width).view(
                s, b, heads, head_dim)
        if self.tp_size == 1 and kernels_apply(flat, self.weight):
            return rms_norm_bf16(flat, self.weight, self.eps).view(s, b, heads, head_dim)
        if lean_norm_applies(flat):
            group = parallel_state.get_tensor_model_parallel_group() if self.tp_size > 1 else None
            out = lean_rms_norm(flat, self.weight, self.eps, group=group, width=self.full_width)
            return out.view(s, b, heads, head_dim)
        square_sum = flat.float().pow(2).sum(-1, keepdim=True)
        if self.tp_size > 1:
            square_sum = _AllReduceBothWays.apply(square_sum, parallel_state.get_tensor_model_parallel_group())
        out = rms_normalize(flat, self.weight, self.eps, mean_square=square_sum / self.full_width)
        return out.view(s, b, heads, head_dim)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state_dict, prefix, {"weight": 0}, sharded_offsets)
