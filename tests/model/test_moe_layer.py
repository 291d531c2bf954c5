"""The MoE layer skips its (Megatron-built) dispatcher's sort by local expert only where it is the
identity, and skipping it changes nothing: outputs and every gradient are bit-identical. The bf16 CPU router
(`route_once`) gives Megatron's probabilities, routing map and router losses exactly."""

import pytest

from olmoe_megatron.testing.distributed import run_on_one_rank
from olmoe_megatron.ops import cpu as cpu_ops
from olmoe_megatron.testing.moe_layer_check import compare_dispatch_sort_skip, compare_route_once


@pytest.fixture(scope="module")
def results():
    return run_on_one_rank(compare_dispatch_sort_skip, {dtype: {"dtype_name": dtype} for dtype in ("fp32", "bf16")})


@pytest.mark.skipif(not cpu_ops.enabled(), reason="no C compiler here: the CPU kernels are not built")
def test_route_once_is_megatrons_router():
    r = run_on_one_rank(compare_route_once, {"bf16": {}})["bf16"]
    assert r["router_class"] == "OlmoeTopKRouter" and r["applies"]
    assert r["hook_saw_map"]  # forward hooks (expert-load metrics) see the routing map
    assert r["probs_equal"] and r["map_equal"]
    assert r["loss_names"] == ["load_balancing_loss", "z_loss"] and r["losses_equal"]
    # One softmax backward instead of two: fp32 sums in another order.
    assert r["max_weight_grad_diff"] <= 1e-5 * r["max_weight_grad"]
    assert r["max_input_grad_diff"] <= 2 ** -7 * r["max_input_grad"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_identity_sort_skip_is_exact(results, dtype):
    r = results[dtype]
    assert r["layer_is_ours"] and r["dispatcher_is_megatrons"] and r["sort_is_identity"]
    assert r["num_local_experts"] > 1  # otherwise Megatron never sorts and the test proves nothing
    assert r["out_equal"] and r["input_grad_equal"]
    assert r["param_grads_equal"] and r["num_param_grads"] > 0


@pytest.mark.parametrize("ep,tp,drop_and_pad,identity", [
    (1, 1, False, True), (2, 1, False, False), (1, 2, False, False), (1, 1, True, False)])
def test_sort_skipped_only_where_it_is_the_identity(ep, tp, drop_and_pad, identity):
    from types import SimpleNamespace

    from olmoe_megatron.model.moe_layer import sort_is_identity

    dispatcher = SimpleNamespace(ep_size=ep, tp_size=tp, drop_and_pad=drop_and_pad, shared_experts=None)
    assert sort_is_identity(dispatcher) is identity
