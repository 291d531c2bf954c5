"""Every parallel layout equals one process: LM loss, load-balancing and z losses, gradient norm
and the loss after one optimizer step, then the validation loss and the log-likelihood of every
choice request of the evaluator (fp32, relative 1e-5), from the same initial weights.

The reference runs on one rank and saves its initial weights; each layout loads them and trains
one step on the same global batch (8 sequences of 32 tokens, one micro-batch each), split over its
data-parallel ranks. Pools of 2, 4 and 8 ranks are reused across layouts.
"""

import pytest

from olmoe_megatron.config.base import config_to_dict
from olmoe_megatron.recipes import get_recipe
from olmoe_megatron.testing import equivalence
from olmoe_megatron.testing.distributed import get_pool

MODEL = config_to_dict(get_recipe("olmoe_tiny").model)
ALLGATHER = {**MODEL, "token_dispatcher": "allgather"}
SEQUENTIAL = {**MODEL, "expert_impl": "sequential"}
KEYS = ("lm_loss", "lb_loss", "z_loss", "grad_norm", "loss_after_step", "eval_loss")

LAYOUTS = {
    2: [
        ("tp2_sp", MODEL, dict(tensor_parallel=2, sequence_parallel=True), {}),
        ("ep2", MODEL, dict(expert_parallel=2), {}),
        ("ep2_allgather", ALLGATHER, dict(expert_parallel=2), {}),
        ("pp2", MODEL, dict(pipeline_parallel=2), {}),
        ("pp2_vpp2", MODEL, dict(pipeline_parallel=2, virtual_pipeline_parallel=2), {}),
        ("dp2_distopt", MODEL, {}, dict(use_distributed_optimizer=True)),
        ("dp2_distopt_overlap", MODEL, {}, dict(use_distributed_optimizer=True, overlap_grad_reduce=True,
                                                overlap_param_gather=True)),
        # Megatron's default bucket (40M parameters) holds all of olmoe_tiny: 100k makes many buckets,
        # each reduced while backward goes on (as in olmoe_1b_7b's 256M-parameter buckets at DP 256).
        ("dp2_distopt_overlap_buckets", MODEL, {}, dict(use_distributed_optimizer=True, overlap_grad_reduce=True,
                                                        overlap_param_gather=True, ddp_bucket_size=100_000)),
    ],
    4: [
        ("ep4", MODEL, dict(expert_parallel=4), {}),
        ("tp2_ep2_sp", MODEL, dict(tensor_parallel=2, expert_parallel=2, sequence_parallel=True), {}),
        ("tp2_ep2_sp_allgather", ALLGATHER, dict(tensor_parallel=2, expert_parallel=2, sequence_parallel=True), {}),
        ("tp2_etp1_ep2_sp", MODEL, dict(tensor_parallel=2, expert_tensor_parallel=1, expert_parallel=2,
                                        sequence_parallel=True), {}),
        ("ep2_etp2", MODEL, dict(tensor_parallel=2, expert_tensor_parallel=2, expert_parallel=2,
                                 sequence_parallel=True), dict(use_distributed_optimizer=True)),
        ("tp2_pp2_vpp2_sp", MODEL, dict(tensor_parallel=2, pipeline_parallel=2, virtual_pipeline_parallel=2,
                                        sequence_parallel=True), {}),
        ("ep4_sequential_experts", SEQUENTIAL, dict(expert_parallel=4), {}),
    ],
    8: [
        ("tp2_ep2_pp2_sp", MODEL, dict(tensor_parallel=2, expert_parallel=2, pipeline_parallel=2,
                                       sequence_parallel=True), {}),
        ("tp2_ep2_pp2_sp_distopt", MODEL, dict(tensor_parallel=2, expert_parallel=2, pipeline_parallel=2,
                                               sequence_parallel=True), dict(use_distributed_optimizer=True)),
    ],
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process: save the initial weights, record one step (also for allgather/sequential)."""
    root = tmp_path_factory.mktemp("equivalence")
    pool = get_pool(1)
    refs = {}
    for name, model in (("default", MODEL), ("allgather", ALLGATHER), ("sequential", SEQUENTIAL)):
        checkpoint = str(root / name)
        refs[name] = (checkpoint, pool.run(equivalence.one_step, model, {}, checkpoint=checkpoint, save=True)[0])
    pool.close()
    return refs


def _reference_for(model, reference):
    if model is ALLGATHER:
        return reference["allgather"]
    if model is SEQUENTIAL:
        return reference["sequential"]
    return reference["default"]


def test_reference_is_a_real_step(reference):
    _, ref = reference["default"]
    assert 10.0 < ref["lm_loss"] < 12.0  # ~log(50304) at init
    assert ref["lb_loss"] > 0 and ref["z_loss"] > 0 and ref["grad_norm"] > 0
    assert ref["loss_after_step"] < ref["lm_loss"]
    assert ref["eval_tokens"] == 5 * 32 - 5 and 10.0 < ref["eval_loss"] < 12.0
    assert all(v < 0 for v in ref["choice_logliks"]) and len(set(ref["choice_logliks"])) == 11


@pytest.mark.parametrize("world_size", sorted(LAYOUTS))
def test_layouts_equal_single_process(reference, world_size):
    pool = get_pool(world_size)
    mismatches = []
    try:
        for name, model, layout, train in LAYOUTS[world_size]:
            checkpoint, ref = _reference_for(model, reference)
            results = pool.run(equivalence.one_step, model, layout, checkpoint=checkpoint, train_dict=train)
            assert all(r == results[0] for r in results), f"{name}: ranks disagree"
            got = results[0]
            for key in KEYS:
                rel = abs(got[key] - ref[key]) / abs(ref[key])
                if rel > 1e-5:
                    mismatches.append(f"{name} ({got['layout']}): {key} {got[key]!r} vs {ref[key]!r} (rel {rel:.1e})")
            if got["eval_tokens"] != ref["eval_tokens"]:
                mismatches.append(f"{name}: evaluated {got['eval_tokens']} tokens, the reference {ref['eval_tokens']}")
            for i, (value, expected) in enumerate(zip(got["choice_logliks"], ref["choice_logliks"], strict=True)):
                rel = abs(value - expected) / abs(expected)
                if rel > 1e-5:
                    mismatches.append(f"{name} ({got['layout']}): choice request {i} log-likelihood {value!r} vs "
                                      f"{expected!r} (rel {rel:.1e})")
    finally:
        pool.close()
    assert not mismatches, "\n".join(mismatches)
