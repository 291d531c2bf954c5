"""The GPU path of RMSNorm and full-width QK-norm (`_LeanRMSNorm`): the same forward as the fp32-graph
path, a backward that agrees with it, less saved for backward, and exact under a TP-split width."""

import pytest
import torch

from olmoe_megatron.model.norms import lean_rms_norm, rms_normalize
from olmoe_megatron.testing.distributed import get_pool
from olmoe_megatron.testing.norm_checks import split_width_layer_norm, split_width_lean_norm


def _graph_path(x, weight, eps):
    """What the CPU fp32 / fallback path computes: autograd over fp32 operators."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _run(fn, x, weight, grad):
    x = x.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        y = fn(x, weight, 1e-5)
    y.backward(grad)
    return y.detach(), x.grad, weight.grad, sum(saved)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lean_norm_matches_the_graph_path(dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 256, generator=generator).to(dtype)
    weight = (1 + 0.1 * torch.randn(256, generator=generator)).to(dtype)
    grad = torch.randn(4, 8, 256, generator=generator).to(dtype)
    lean = _run(lambda a, w, e: lean_rms_norm(a, w, e), x, weight, grad)
    graph = _run(_graph_path, x, weight, grad)
    assert torch.equal(lean[0], graph[0])  # the same forward arithmetic
    tolerance = 2 ** -7 if dtype == torch.bfloat16 else 1e-5
    for got, want in ((lean[1], graph[1]), (lean[2], graph[2])):
        assert (got.float() - want.float()).abs().max() <= tolerance * want.float().abs().max()


def test_lean_norm_saves_the_input_once_in_its_own_dtype():
    x = torch.randn(64, 512).bfloat16()
    weight = torch.ones(512).bfloat16()
    grad = torch.randn(64, 512).bfloat16()
    lean_saved = _run(lambda a, w, e: lean_rms_norm(a, w, e), x, weight, grad)[3]
    graph_saved = _run(_graph_path, x, weight, grad)[3]
    elements = x.numel()
    assert lean_saved == 2 * elements + 2 * 512 + 4 * 64  # x (bf16), weight (bf16), rstd per row (fp32)
    assert graph_saved >= 6 * elements  # an fp32 copy of x and the bf16 normalised tensor


def test_lean_norm_over_a_split_width_equals_the_whole_width():
    for r in get_pool(2).run(split_width_lean_norm):
        assert r["y_equal"] and r["grad_w_equal"]
        assert r["grad_x_max_diff"] <= 2 ** -7 * r["grad_x_max"]


def test_full_width_layernorm_over_a_split_width_equals_the_whole_width():
    """model.norm_type='layernorm' (the norm ablation): the QK LayerNorm's mean and variance over a
    TP-split width, against the whole width and torch's LayerNorm (a scale, no bias)."""
    for r in get_pool(2).run(split_width_layer_norm):
        assert r["reference_max_diff"] <= 1e-6
        assert r["y_max_diff"] <= 1e-5 and r["grad_w_max_diff"] <= 1e-5
        assert r["grad_x_max_diff"] <= 1e-5 * r["grad_x_max"]


def test_cpu_paths_are_unchanged():
    """fp32 on CPU keeps the graph path bit for bit (golden losses); the lean path is for CUDA."""
    x = torch.randn(3, 64)
    weight = torch.rand(64)
    assert torch.equal(rms_normalize(x, weight, 1e-5), _graph_path(x, weight, 1e-5))
