"""Expert-choice routing (model/expert_choice.py): each expert takes exactly C tokens of each sequence,
a token gets 0..E experts, the weights are the softmax scores there; the capacity rounding and the
config rules; and EP2, EP2 with the allgather dispatcher and TP2 + sequence parallel equal one process.
"""

import math

import pytest

from olmoe_megatron.config import ConfigError
from olmoe_megatron.model.config import ModelConfig, expert_capacity
from olmoe_megatron.recipes import get_recipe
from olmoe_megatron.testing import equivalence
from olmoe_megatron.testing.distributed import get_pool
from olmoe_megatron.testing.expert_choice_check import (
    check_router_and_layer,
    expert_choice_model_dict,
    known_answer_routing,
)

TINY = get_recipe("olmoe_tiny").model
EC = dict(router_type="expert_choice", router_aux_loss_coeff=0.0)


# ----------------------------------------------------------------- capacity and config rules
@pytest.mark.parametrize("seq_length,top_k,num_experts,factor,capacity", [
    (4096, 8, 64, 1.0, 512),   # OLMoE-1B-7B's shape: k * S / E exactly
    (256, 8, 64, 1.0, 32),     # ablation_expert_choice
    (32, 2, 8, 0.7, 5),        # 5.6 floors to 5 (megablocks' integer division)
    (10, 1, 3, 1.0, 3),        # 3.33 -> 3
    (256, 8, 64, 1.1, 35),     # 35.2 -> 35
    (1, 100, 1, 0.29, 29),     # 0.29 * 100 is 28.999999999999996 in floats: still 29
    (3, 2, 8, 1.0, 0),         # fewer than one token per expert
])
def test_capacity_is_the_floor_of_factor_k_s_over_e(seq_length, top_k, num_experts, factor, capacity):
    assert expert_capacity(seq_length=seq_length, top_k=top_k, num_experts=num_experts,
                           capacity_factor=factor) == capacity


def test_recipe_keeps_the_token_choice_ablations_parameters():
    run = get_recipe("ablation_expert_choice")
    token_choice = get_recipe("ablation_64e_top8")
    assert run.model.router_type == "expert_choice" and run.model.router_aux_loss_coeff == 0
    assert run.model.router_z_loss_coeff == token_choice.model.router_z_loss_coeff > 0
    assert run.model.expert_capacity(run.train.seq_length) == 32
    for active in (True, False):
        assert run.model.num_params(active=active) == token_choice.model.num_params(active=active)
    assert run.model.replace(router_type="token_choice", router_aux_loss_coeff=0.01) == token_choice.model


@pytest.mark.parametrize("changes,words", [
    (dict(expert_capacity_factor=1.5), ["model.expert_capacity_factor=1.5", "router_type='expert_choice'"]),
    (dict(EC, num_experts=0, ffn_hidden_size=64), ["router_type='expert_choice'", "num_experts > 0"]),
    (dict(EC, expert_capacity_factor=0.0), ["model.expert_capacity_factor=0.0", "must be > 0"]),
    (dict(EC, expert_capacity_factor=-1.0), ["model.expert_capacity_factor=-1.0", "must be > 0"]),
    (dict(EC, expert_capacity_factor=5.0), ["model.expert_capacity_factor=5.0", "model.top_k=2",
                                            "model.num_experts=8", "factor <= 4"]),
    (dict(router_type="expert_choice"), ["model.router_aux_loss_coeff=0.01", "set model.router_aux_loss_coeff=0"]),
    (dict(router_type="expert_choose"), ["router_type", "expert_choice"]),
])
def test_config_errors_name_field_value_and_fix(changes, words):
    with pytest.raises(ConfigError) as error:
        ModelConfig.from_dict({**TINY.to_dict(), **changes})
    for word in words:
        assert word in str(error.value)


def test_run_config_refuses_capacity_zero_and_context_parallel():
    run = get_recipe("olmoe_tiny")
    model = run.model.replace(**EC)
    with pytest.raises(ConfigError) as error:
        run.replace(model=model, train=run.train.replace(seq_length=3))
    message = str(error.value)
    assert "train.seq_length=3" in message and "= 0 tokens" in message and "seq_length (>= 4" in message
    with pytest.raises(ConfigError, match="parallel.context_parallel=2.*context_parallel=1"):
        run.replace(model=model, parallel=run.parallel.replace(context_parallel=2))
    assert run.replace(model=model).model.expert_capacity(32) == 8


def test_megatron_config_and_spec():
    from olmoe_megatron.model.expert_choice import ExpertChoiceRouter
    from olmoe_megatron.model.megatron_config import to_transformer_config
    from olmoe_megatron.model.moe_layer import OlmoeTopKRouter
    from olmoe_megatron.model.precision import PrecisionConfig
    from olmoe_megatron.model.spec import layer_spec
    from olmoe_megatron.parallel.layout import ParallelLayout

    model = TINY.replace(**EC, expert_capacity_factor=0.7)
    cfg = to_transformer_config(model, ParallelLayout(), precision=PrecisionConfig(dtype="fp32"), backend="gloo")
    assert cfg.moe_expert_capacity_factor == 0.7 and not cfg.moe_pad_expert_input_to_capacity
    assert cfg.moe_router_load_balancing_type == "none" and cfg.moe_z_loss_coeff > 0
    token_choice = to_transformer_config(TINY, ParallelLayout(), precision=PrecisionConfig(dtype="fp32"),
                                         backend="gloo")
    assert token_choice.moe_expert_capacity_factor is None
    assert layer_spec(model).submodules.mlp.submodules.router is ExpertChoiceRouter
    assert layer_spec(TINY).submodules.mlp.submodules.router is OlmoeTopKRouter


# ----------------------------------------------------------------- the router and the layer, one process
MODEL = expert_choice_model_dict()
ALLGATHER = {**MODEL, "token_dispatcher": "allgather"}
STEP = dict(num_sequences=4, micro_batch_size=2)  # routing is per sequence: the micro-batch size changes nothing


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """One rank: the router and layer checks, and the reference step (saving its initial weights)."""
    checkpoint = str(tmp_path_factory.mktemp("expert_choice") / "reference")
    pool = get_pool(1)
    try:
        reference = pool.run(equivalence.one_step, MODEL, {}, checkpoint=checkpoint, save=True, **STEP)[0]
        return {**pool.run(check_router_and_layer)[0], "known": pool.run(known_answer_routing)[0],
                "reference": (checkpoint, reference)}
    finally:
        pool.close()


def test_each_expert_takes_exactly_c_tokens_per_sequence(one_process):
    r = one_process
    assert r["router_class"] == "ExpertChoiceRouter" and r["is_expert_choice"]
    assert r["capacity"] == 5 and r["per_sequence_expert_counts"] == [5]
    assert r["chosen_are_top"] and r["sequences_independent"]
    assert r["probs_are_scores_at_map"] and r["probs_dtype"] == "torch.float32"
    assert min(r["experts_per_token"]) == 0 and max(r["experts_per_token"]) > 2  # 0..E, not top_k = 2


def test_known_answer(one_process):
    known = one_process["known"]
    assert known["map"] == [[1, 1, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    for t, row in enumerate(known["map"]):
        for e, chosen in enumerate(row):
            assert known["probs"][t][e] == (known["scores"][t][e] if chosen else 0.0)


def test_layer_routes_a_variable_number_of_rows(one_process):
    r = one_process
    assert r["rows_routed"] == 8 * 5 * 3 != r["rows_token_choice"]  # E * C * B, not S * B * k
    assert r["layer_max_diff"] <= 1e-5 * r["layer_max"]
    assert r["grad_max_diff"] <= 1e-5 * r["grad_max"]


# ----------------------------------------------------------------- layouts equal one process
LAYOUTS = [
    ("ep2", MODEL, dict(expert_parallel=2)),
    ("ep2_allgather", ALLGATHER, dict(expert_parallel=2)),
    ("tp2_sp", MODEL, dict(tensor_parallel=2, sequence_parallel=True)),
]
KEYS = ("lm_loss", "z_loss", "grad_norm", "loss_after_step", "eval_loss")


def test_layouts_equal_single_process(one_process):
    """One step and the evaluation, from the reference's weights; allgather against the alltoall
    reference (the same weights and the same routing). The choice requests are compared where DP is
    1 as in the reference: the evaluator pads a DP group of micro-batches to their longest request,
    and under expert choice a sequence's padded length (C, and the padding tokens competing for the
    experts) changes its routing, so DP 2 scores them differently, rightly."""
    checkpoint, ref = one_process["reference"]
    assert ref["lb_loss"] == 0.0 and ref["z_loss"] > 0 and ref["loss_after_step"] < ref["lm_loss"]
    pool = get_pool(2)
    mismatches = []
    try:
        for name, model, layout in LAYOUTS:
            results = pool.run(equivalence.one_step, model, layout, checkpoint=checkpoint, **STEP)
            assert all(r == results[0] for r in results), f"{name}: ranks disagree"
            got = results[0]
            assert got["lb_loss"] == 0.0, name
            pairs = [(key, got[key], ref[key]) for key in KEYS]
            if dict(part.split("=") for part in got["layout"].split())["dp"] == "1":
                pairs += [(f"choice request {i}", a, b) for i, (a, b) in
                          enumerate(zip(got["choice_logliks"], ref["choice_logliks"], strict=True))]
            for key, value, expected in pairs:
                if not math.isclose(value, expected, rel_tol=1e-5):
                    mismatches.append(f"{name} ({got['layout']}): {key} {value!r} vs {expected!r}")
    finally:
        pool.close()
    assert not mismatches, "\n".join(mismatches)
