"""The local spec's core attention (DispatchingCoreAttention, bf16) matches Megatron's
DotProductAttention on both of its CPU paths (explicit scores for short sequences, with and without
the fused softmax kernels; SDPA for long ones); fp32 uses Megatron's path."""

import pytest

from olmoe_megatron.testing.attention_check import compare_core_attention
from olmoe_megatron.testing.distributed import run_on_one_rank

CASES = {
    "scores-causal": dict(dtype_name="bf16"),
    "scores-no_mask": dict(dtype_name="bf16", mask="no_mask"),
    "scores-torch-causal": dict(dtype_name="bf16", cpu_kernels=False),
    "sdpa-causal": dict(dtype_name="bf16", scores_max_elements=0),
    "sdpa-no_mask": dict(dtype_name="bf16", mask="no_mask", scores_max_elements=0),
    "fp32": dict(dtype_name="fp32"),
}


@pytest.fixture(scope="module")
def results():
    return run_on_one_rank(compare_core_attention, CASES)


@pytest.mark.parametrize("case", [c for c in CASES if c != "fp32"])
def test_bf16_attention_matches_megatron_attention(results, case):
    r = results[case]
    assert r["path"] == ("scores" if case.startswith("scores") else "other")
    assert r["shape"] == [64, 2, 64]
    assert r["max_out_diff"] <= 2 ** -7 * max(1.0, r["max_out"])  # a bf16 rounding step or two
    assert r["max_grad_diff"] <= 2 ** -6 * max(1.0, r["max_grad"])


def test_fp32_is_megatron_bit_for_bit(results):
    assert results["fp32"]["path"] == "other"
    assert results["fp32"]["max_out_diff"] == 0.0 and results["fp32"]["max_grad_diff"] == 0.0
