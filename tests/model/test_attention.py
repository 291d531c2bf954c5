"""The SDPA core attention (bf16) matches Megatron's DotProductAttention; fp32 uses Megatron's path."""

import pytest

from olmoe_megatron.testing.attention_check import compare_core_attention
from olmoe_megatron.testing.distributed import get_pool


@pytest.fixture(scope="module")
def results():
    pool = get_pool(1)
    out = {dtype: pool.run(compare_core_attention, dtype)[0] for dtype in ("bf16", "fp32")}
    pool.close()
    return out


def test_bf16_sdpa_matches_megatron_attention(results):
    r = results["bf16"]
    assert r["shape"] == [64, 2, 64]
    assert r["max_out_diff"] <= 2 ** -7 * max(1.0, r["max_out"])  # a bf16 rounding step or two
    assert r["max_grad_diff"] <= 2 ** -6 * max(1.0, r["max_grad"])


def test_fp32_is_megatron_bit_for_bit(results):
    assert results["fp32"]["max_out_diff"] == 0.0 and results["fp32"]["max_grad_diff"] == 0.0
