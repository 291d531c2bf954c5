"""Megatron's optimizer as built here is OLMoE's AdamW: on torch's fused CPU kernel in fp32, in one
pass with the clip and the bf16 model copy in bf16 (training/cpu_optimizer.py)."""

import pytest

from olmoe_megatron.testing.distributed import run_on_one_rank
from olmoe_megatron.testing.optimizer_check import compare_adamw_step


@pytest.fixture(scope="module")
def results():
    cases = {dtype: {"dtype_name": dtype} for dtype in ("fp32", "bf16")}
    cases["bf16_no_decay_norms_embeddings"] = {"dtype_name": "bf16", "decay_norms_and_embeddings": False}
    return run_on_one_rank(compare_adamw_step, cases)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fused_step_equals_reference_adamw(results, dtype):
    r = results[dtype]
    assert r["fused"] == [True]
    assert r["decay"] == [0.1]  # every parameter decays, norms and embeddings included
    assert r["min_moved"] > 0  # every parameter was updated
    assert r["max_diff"] <= 1e-6 * r["max_param"], r
    assert r["one_pass"] == (dtype == "bf16")
    assert r["model_copy_exact"]  # the bf16 model weights are the updated main weights, rounded
    assert r["norm_rel_diff"] < 1e-6  # the one-pass gradient norm is Megatron's


def test_one_pass_step_honours_per_group_decay(results):
    """train.decay_norms_and_embeddings=false: norm weights (1-D) and the input embedding (2-D) in a
    group without decay; the one-pass bf16 step applies each group's own decay, as torch's AdamW."""
    r = results["bf16_no_decay_norms_embeddings"]
    assert r["decay"] == [0.0, 0.1] and r["no_decay_dims"] == [1, 2]
    assert r["one_pass"] and r["min_moved"] > 0
    assert r["max_diff"] <= 1e-6 * r["max_param"], r
    assert r["model_copy_exact"]


def test_reference_step_was_clipped(results):
    assert results["bf16"]["clipped"]  # the replay checks the clip factor too
