"""PaddedOrStackedSwiGLUExperts (expert_impl="grouped"): the CPU padded path equals Megatron's
SequentialMLP (outputs and all gradients), and its padding keeps every expert GEMM on a small set
of row counts."""

import pytest
import torch

from olmoe_megatron.model.experts import CPU_ROW_ALIGN, _PaddedSwiGLU, cpu_row_align, padded_layout
from olmoe_megatron.testing.distributed import run_on_one_rank
from olmoe_megatron.testing.experts_check import compare_experts

# Uneven counts with an empty expert, one exact multiple of the alignment and one single token.
COUNTS = [5, 0, 37, CPU_ROW_ALIGN * 2, 1, 33]


@pytest.fixture(scope="module")
def results():
    cases = {dtype: {"dtype_name": dtype, "tokens_per_expert": COUNTS} for dtype in ("fp32", "bf16")}
    cases["empty"] = {"dtype_name": "fp32", "tokens_per_expert": [0, 0, 0]}
    return run_on_one_rank(compare_experts, cases)


def test_padded_layout():
    padded, index = padded_layout([3, 0, 8, 9], 8)
    assert padded == [8, 0, 8, 16]
    assert index.tolist() == [0, 1, 2, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]


def test_fp32_matches_sequential_mlp(results):
    r = results["fp32"]
    assert r["grad_fn"] == "_PaddedSwiGLUBackward"  # the CPU path ran, not a fallback
    assert r["bias_is_none"] and r["shape"] == [sum(COUNTS), 32]
    assert r["max_out_diff"] <= 1e-6 * r["max_out"]
    assert r["max_grad_diff"] <= 1e-6 * r["max_grad"]


def test_bf16_matches_sequential_mlp(results):
    r = results["bf16"]
    assert r["grad_fn"] == "_PaddedSwiGLUBackward"
    assert r["max_out_diff"] <= 2 ** -7 * r["max_out"]  # a bf16 rounding step or two
    # The same dtypes as SequentialMLP's autograd, a different order of operations: a bf16 step apart.
    assert r["max_grad_diff"] <= 2 ** -7 * r["max_grad"]


def test_no_tokens_routed(results):
    r = results["empty"]
    assert r["shape"] == [0, 32] and r["max_grad_diff"] == 0.0


def test_expert_gemms_use_aligned_row_counts(monkeypatch):
    """Every GEMM's token dimension is a multiple of CPU_ROW_ALIGN, whatever the routing."""
    seen = []
    real_mm = torch.mm

    def recording_mm(a, b, *, out=None):
        seen.append((a.shape, b.shape))
        return real_mm(a, b, out=out) if out is not None else real_mm(a, b)

    monkeypatch.setattr(torch, "mm", recording_mm)
    generator = torch.Generator().manual_seed(1)
    counts = torch.randint(0, 90, (6,), generator=generator).tolist()
    padded, index = padded_layout(counts, CPU_ROW_ALIGN)
    x = torch.randn(sum(counts), 16, requires_grad=True)
    probs = torch.rand(sum(counts), requires_grad=True)
    weights = [torch.randn(20, 16, requires_grad=True) for _ in counts] + [torch.randn(16, 10, requires_grad=True) for _ in counts]
    _PaddedSwiGLU.apply(x, probs, padded, index, counts, *weights).sum().backward()
    rows = {dim for a, b in seen for dim in (*a, *b) if dim not in (16, 20, 10)}
    assert CPU_ROW_ALIGN >= 16  # a bounded set of shapes needs real alignment
    assert seen and rows and all(r % CPU_ROW_ALIGN == 0 for r in rows), rows


def test_row_alignment_by_dtype():
    assert cpu_row_align(torch.bfloat16) == cpu_row_align(torch.float16) == CPU_ROW_ALIGN
    assert cpu_row_align(torch.float32) == 1  # MKL's fp32 GEMMs are not compiled per shape


def test_unpadded_path_equals_padded():
    """align 1 (fp32) skips the scatter/gather; the result equals the padded computation."""
    generator = torch.Generator().manual_seed(2)
    counts = [7, 0, 19, 3]
    x = torch.randn(sum(counts), 8, generator=generator, requires_grad=True)
    probs = torch.rand(sum(counts), generator=generator, requires_grad=True)
    weights = [torch.randn(12, 8, generator=generator, requires_grad=True) for _ in counts] + [
        torch.randn(8, 6, generator=generator, requires_grad=True) for _ in counts]
    results = []
    for align in (1, CPU_ROW_ALIGN):
        padded, index = padded_layout(counts, align)
        out = _PaddedSwiGLU.apply(x, probs, padded, index, counts, *weights)
        grads = torch.autograd.grad((out * torch.arange(out.numel()).view_as(out)).sum(), [x, probs, *weights])
        results.append((out, grads))
    (out1, grads1), (out32, grads32) = results
    torch.testing.assert_close(out1, out32, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads1, grads32):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
