"""Every tensor the per-step metrics hand to a collective lives on `context.device` (NCCL groups have
no CPU backend), and the expert-load counts stay on the routers' device between reductions."""

import types

import pytest
import torch

from olmoe_megatron.testing.collective_devices_check import cpu_tensor_on_cuda_only_group, metrics_collective_devices
from olmoe_megatron.testing.distributed import get_pool
from olmoe_megatron.training.moe_metrics import ExpertLoadCounter

LAYOUT = {"expert_parallel": 2}  # 2 ranks: DP 2, experts split over both


@pytest.fixture(scope="module")
def pool2():
    return get_pool(2)


@pytest.fixture(scope="module")
def results(pool2):
    return pool2.run(metrics_collective_devices, LAYOUT)


def test_cpu_tensor_on_a_group_without_cpu_backend_fails_like_nccl(pool2):
    """The failure mode is real: a group with a backend for CUDA only rejects a CPU tensor."""
    for error in pool2.run(cpu_tensor_on_cuda_only_group):
        assert "No backend type associated with device type cpu" in error


def test_recorder_catches_a_tensor_left_on_the_default_device(results):
    for r in results:
        assert r["control"] == {"ops": {"allreduce_": 1}, "devices": ["meta"]}


def test_every_metric_collective_runs_on_the_context_device(results):
    for r in results:
        assert r["context_device"] == "cpu"
        # reduce_router_losses 5, two reduce_and_reset 3 each, job_peak 1, _StopSignal 1, _mean_lm_loss 2
        assert r["recorded"]["ops"] == {"allreduce_": 15}
        assert r["recorded"]["devices"] == [r["context_device"]]


def test_reduced_values_are_the_global_ones(results):
    counts_LE = torch.tensor([r["local_counts"] for r in results], dtype=torch.float64).sum(0)
    tokens_per_layer = counts_LE.sum(1)
    assert torch.all(tokens_per_layer == tokens_per_layer[0]) and tokens_per_layer[0] > 0
    for r in results:
        assert r["counts_device"] == "cpu"  # the routers' device (the CPU here)
        assert r["load"]["max_tokens_per_expert"] == counts_LE.max(1).values.tolist()
        assert r["load"]["min_tokens_per_expert"] == counts_LE.min(1).values.tolist()
        assert r["load"]["busiest_expert_share"] == (counts_LE.max(1).values / tokens_per_layer).tolist()
        assert r["load_after_reset"]["max_tokens_per_expert"] == [0.0] * len(tokens_per_layer)
        assert r["router"]["lb_loss"] > 0 and r["router"]["z_loss"] > 0
        assert r["router"] == results[0]["router"]
        assert r["peak_is_positive"] and r["stop"] is False and r["lm_loss"] == 2.0


def test_expert_load_counts_stay_on_the_routing_maps_device():
    """No host copy per router call: the counts are created on, and added on, the map's device
    (`meta` stands in for a GPU here: a `.to("cpu")` of it would raise)."""
    counter = ExpertLoadCounter(num_layers=3, num_experts=4)
    router = types.SimpleNamespace(training=True, layer_number=2)
    routing_map_TE = torch.ones(5, 4, dtype=torch.bool, device="meta")
    counter._hook(router, (), (None, routing_map_TE))
    counter._hook(router, (), (None, routing_map_TE))
    assert counter.counts_LE.device.type == "meta" and counter.counts_LE.dtype == torch.float64


def test_expert_load_counts_routed_tokens_per_layer():
    counter = ExpertLoadCounter(num_layers=2, num_experts=3)
    routing_map_TE = torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    counter._hook(types.SimpleNamespace(training=True, layer_number=2), (), (None, routing_map_TE))
    counter._hook(types.SimpleNamespace(training=False, layer_number=1), (), (None, routing_map_TE))  # eval: skipped
    assert counter.counts_LE.tolist() == [[0.0, 0.0, 0.0], [1.0, 0.0, 2.0]]
