"""The ablation axes: each recipe's parameter budget as `olmoe dry-run` prints it, and what its switch
changes in the built model, its optimizer and a training step (olmoe_megatron/testing/ablation_checks.py).
The full-width QK LayerNorm under TP is in tests/model/test_norms.py (its two-rank pool)."""

import re

import pytest

from olmoe_megatron.config import ConfigError
from olmoe_megatron.launcher.cli import main
from olmoe_megatron.model.config import ModelConfig
from olmoe_megatron.recipes import get_recipe, list_recipes
from olmoe_megatron.testing import ablation_checks
from olmoe_megatron.testing.distributed import get_pool

_BASE = "ablation_64e_top8"
_GRANULARITY = ("ablation_8e_top1", "ablation_32e_top4", "ablation_64e_top8", "ablation_128e_top16")
#: Recipes whose model has ablation_64e_top8's parameters exactly (they change no parameter).
_SAME_PARAMS = ("ablation_no_lb", "ablation_no_zloss", "ablation_normal_init", "ablation_layernorm",
                "ablation_no_decay_norms_embeddings", "ablation_adam_eps_1e5", "ablation_expert_bias",
                "ablation_global_lb")


def _dry_run_counts(recipe: str, capsys) -> tuple[int, int]:
    assert main(["dry-run", "--recipe", recipe, "--quiet-config"]) == 0
    out = capsys.readouterr().out
    found = re.search(r"^  exact\s+([\d,]+) total, ([\d,]+) active per token$", out, flags=re.MULTILINE)
    assert found, out
    return int(found[1].replace(",", "")), int(found[2].replace(",", ""))


def _routers(model: ModelConfig) -> int:
    return model.num_layers * model.d_model * model.num_experts


def test_every_recipe_says_what_it_varies():
    recipes = list_recipes()
    for name in (*_GRANULARITY, *_SAME_PARAMS, "ablation_no_qk_norm", "ablation_shared_expert", "ablation_dense"):
        assert name in recipes and len(recipes[name]) > 20, name


def test_dry_run_parameter_budgets(capsys):
    counts = {name: _dry_run_counts(name, capsys) for name in
              (*_GRANULARITY, *_SAME_PARAMS, "ablation_no_qk_norm", "ablation_shared_expert", "ablation_dense")}
    for name, (total, active) in counts.items():
        model = get_recipe(name).model
        assert (total, active) == (model.num_params(), model.num_params(active=True)), name
    # Granularity: the same active and total parameters once the (tiny) routers are set aside.
    without_routers = {(counts[n][0] - _routers(get_recipe(n).model), counts[n][1] - _routers(get_recipe(n).model))
                       for n in _GRANULARITY}
    assert len(without_routers) == 1
    for name in _SAME_PARAMS:
        assert counts[name] == counts[_BASE], name
    base = get_recipe(_BASE).model
    # QK-norm off: the full-width q and k scales of every layer go.
    assert counts[_BASE][0] - counts["ablation_no_qk_norm"][0] == base.num_layers * 2 * base.d_model
    assert counts[_BASE][1] - counts["ablation_no_qk_norm"][1] == base.num_layers * 2 * base.d_model
    # Shared expert as OLMoE ran it: against 32 experts top-4, the same active, one more expert in total.
    shared, top4 = counts["ablation_shared_expert"], counts["ablation_32e_top4"]
    shared_model = get_recipe("ablation_shared_expert").model
    assert (shared_model.num_experts, shared_model.top_k, shared_model.num_shared_experts) == (32, 3, 1)
    assert shared[1] == top4[1]
    assert shared[0] - top4[0] == shared_model.num_layers * shared_model.expert_params()
    # Dense: the MoE's active parameters without the routers.
    assert counts["ablation_dense"] == (counts[_BASE][1] - _routers(base),) * 2


def test_recipes_change_only_their_axis():
    base = get_recipe(_BASE)
    model_axes = {
        "ablation_128e_top16": {"num_experts": 128, "top_k": 16, "expert_ffn_hidden_size": 32},
        "ablation_normal_init": {"init_cutoff_stds": None},
        "ablation_layernorm": {"norm_type": "layernorm"},
        "ablation_no_qk_norm": {"qk_norm": False},
        "ablation_expert_bias": {"router_score_function": "sigmoid", "router_expert_bias": True,
                                 "router_aux_loss_coeff": 0.0},
        "ablation_global_lb": {"router_load_balancing": "global_batch"},
    }
    for name, changes in model_axes.items():
        assert get_recipe(name).model == base.model.replace(**changes), name
    train_axes = {
        "ablation_no_decay_norms_embeddings": {"decay_norms_and_embeddings": False},
        "ablation_adam_eps_1e5": {"adam_eps": 1e-5},
        "ablation_global_lb": {"micro_batch_size": 1},
    }
    for name, changes in train_axes.items():
        assert get_recipe(name).train == base.train.replace(**changes), name


def test_megatron_fields_of_the_axes():
    import torch

    from olmoe_megatron.model.megatron_config import to_transformer_config
    from olmoe_megatron.model.precision import PrecisionConfig
    from olmoe_megatron.parallel.layout import ParallelLayout

    def translate(name):
        return to_transformer_config(get_recipe(name).model, ParallelLayout(), precision=PrecisionConfig(dtype="fp32"),
                                     backend="gloo")

    base = translate(_BASE)
    assert (base.normalization, base.moe_router_score_function, base.moe_router_enable_expert_bias,
            base.moe_router_load_balancing_type) == ("RMSNorm", "softmax", False, "aux_loss")
    assert base.init_method.func is torch.nn.init.trunc_normal_
    assert translate("ablation_layernorm").normalization == "LayerNorm"
    plain = translate("ablation_normal_init")
    for init in (plain.init_method, plain.output_layer_init_method, plain.embedding_init_method):
        assert init.func is torch.nn.init.normal_ and init.keywords == {"mean": 0.0, "std": 0.02}
    bias = translate("ablation_expert_bias")
    assert (bias.moe_router_score_function, bias.moe_router_enable_expert_bias, bias.moe_router_bias_update_rate,
            bias.moe_router_load_balancing_type) == ("sigmoid", True, 1e-3, "none")
    global_lb = translate("ablation_global_lb")
    assert global_lb.moe_router_load_balancing_type == "global_aux_loss"
    assert global_lb.moe_aux_loss_coeff == base.moe_aux_loss_coeff


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"init_cutoff_stds": -1.0}, r"model.init_cutoff_stds=-1.0 must be > 0 \(OLMoE: 3\), or null"),
        ({"router_expert_bias": True}, r"model.router_expert_bias=true needs model.router_score_function='sigmoid'"),
        ({"router_load_balancing": "global_batch", "router_aux_loss_coeff": 0.0},
         r"model.router_load_balancing='global_batch' .*model.router_aux_loss_coeff=0 turns that loss off"),
        ({"num_experts": 0, "router_score_function": "sigmoid"},
         r"model.router_score_function='sigmoid' applies to token-choice MoE routing only"),
        ({"router_score_function": "sigmoid", "router_expert_bias": True, "router_bias_update_rate": -1.0},
         r"model.router_bias_update_rate=-1.0 must be >= 0"),
    ],
)
def test_ablation_field_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**changes)


def test_yaml_null_cutoff_is_plain_normal():
    assert ModelConfig().with_overrides(["init_cutoff_stds=null"]).init_cutoff_stds is None


# ----------------------------------------------------------------- built models (one rank)
_BUILT = (_BASE, "ablation_normal_init", "ablation_layernorm", "ablation_no_qk_norm",
          "ablation_no_decay_norms_embeddings", "ablation_adam_eps_1e5")


@pytest.fixture(scope="module")
def built():
    """One process: each recipe's model built at 2 layers, an expert-bias step, the LB losses."""
    pool = get_pool(1)
    try:
        facts = {name: pool.run(ablation_checks.built_model_facts, recipe_name=name)[0] for name in _BUILT}
        facts["expert_bias"] = pool.run(ablation_checks.expert_bias_step)[0]
        for count in (1, 2):
            facts[f"lb_{count}"] = pool.run(ablation_checks.load_balancing_losses, num_microbatches=count)[0]
    finally:
        pool.close()
    return facts


def test_built_models_have_the_configs_parameter_counts(built):
    for name in _BUILT:
        assert built[name]["num_params"] == built[name]["config_num_params"], name


def test_plain_normal_init_is_not_truncated(built):
    """1M embedding values: about 0.27% of N(0, 1) lies beyond 3 std; none after truncation."""
    truncated, plain = built[_BASE], built["ablation_normal_init"]
    assert truncated["embedding_beyond_3_std"] == 0 and truncated["embedding_max_abs_in_std"] <= 3.0
    assert 0.002 * plain["num_embedding_values"] < plain["embedding_beyond_3_std"] < 0.0035 * plain["num_embedding_values"]
    assert plain["embedding_max_abs_in_std"] > 4.0
    assert plain["embedding_std"] == pytest.approx(0.02, rel=0.01)
    assert truncated["embedding_std"] == pytest.approx(0.01973, rel=0.01)  # N(0, 0.02) cut at 3 std


def test_layernorm_replaces_every_norm(built):
    rms, layer = built[_BASE], built["ablation_layernorm"]
    assert rms["normalization"] == "RMSNorm" and layer["normalization"] == "LayerNorm"
    assert set(rms["norm_classes"]) == {"RMSNorm", "FullWidthQKNorm"} and rms["qk_norm_types"] == ["rmsnorm"]
    assert set(layer["norm_classes"]) == {"LayerNorm", "FullWidthQKNorm"} and layer["qk_norm_types"] == ["layernorm"]
    assert layer["num_params"] == rms["num_params"]  # a scale, no bias: RMSNorm's parameters


def test_no_qk_norm_builds_no_qk_norms(built):
    base, off = built[_BASE], built["ablation_no_qk_norm"]
    assert base["num_qk_norms"] == 4 and off["num_qk_norms"] == 0  # q and k in each of 2 layers
    assert base["num_params"] - off["num_params"] == 2 * 2 * 256


def test_no_decay_on_norms_and_embeddings(built):
    base, off = built[_BASE], built["ablation_no_decay_norms_embeddings"]
    assert base["decays"] == [0.1] and base["no_decay"] == []
    assert off["decays"] == [0.0, 0.1]
    assert off["no_decay"] == off["expected_no_decay"]
    assert any(n.endswith("word_embeddings.weight") for n in off["no_decay"])
    assert any(n.endswith("final_layernorm.weight") for n in off["no_decay"])
    assert any(n.endswith("q_layernorm.weight") for n in off["no_decay"])
    assert off["decayed_includes_output_layer"]  # the lm head is a linear map: it still decays, as in OLMo
    assert off["num_decayed"] + len(off["no_decay"]) == base["num_decayed"]


def test_adam_eps(built):
    assert built[_BASE]["eps"] == [1e-8] and built["ablation_adam_eps_1e5"]["eps"] == [1e-5]


def test_expert_bias_moves_in_the_training_step_and_is_checkpointed(built):
    r = built["expert_bias"]
    assert r["enable_expert_bias"] and r["score_function"] == "sigmoid" and r["update_rate"] == 1e-3
    assert r["updated"] and r["before_all_zero"]
    # finalize_model_grads moved every bias by sign(mean load - load) * 1e-3 (0 exactly at the mean).
    assert r["moved_by"][-1] == pytest.approx(1e-3) and set(r["moved_by"]) <= {0.0, r["moved_by"][-1]}
    assert r["bias_dtype"] == "torch.float32"
    assert r["metrics_min"] == r["true_min"] and r["metrics_max"] == r["true_max"]
    assert all(lo < 0 < hi for lo, hi in zip(r["metrics_min"], r["metrics_max"]))
    assert r["counts_reset"]  # the step's token counts start over
    assert r["sharded_keys"] == ["decoder.layers.0.mlp.router.expert_bias", "decoder.layers.1.mlp.router.expert_bias"]
    assert r["restored_from_checkpoint"]
    assert r["lb_loss"] == 0.0  # aux-loss-free


def test_global_batch_load_balancing(built):
    """One micro-batch per step: the global-batch loss is the micro-batch loss; two: it differs."""
    one, two = built["lb_1"], built["lb_2"]
    assert one["micro_batch"]["type"] == "aux_loss" and one["global_batch"]["type"] == "global_aux_loss"
    assert one["global_batch"]["lb_loss"] == pytest.approx(one["micro_batch"]["lb_loss"], rel=1e-6)
    assert two["global_batch"]["lb_loss"] > 0
    assert abs(two["global_batch"]["lb_loss"] - two["micro_batch"]["lb_loss"]) > 1e-3 * two["micro_batch"]["lb_loss"]
    assert two["global_batch"]["lm_loss"] == two["micro_batch"]["lm_loss"]  # the same weights and batches
    assert two["global_batch"]["global_counts_reset"]  # finalize_model_grads resets the step's counts


def test_hf_export_refuses_what_hf_olmoe_cannot_hold():
    from olmoe_megatron.convert.errors import ConversionError
    from olmoe_megatron.convert.mcore_to_hf import check_hf_representable

    check_hf_representable(get_recipe(_BASE).model, source="ckpt")
    for name, field in (("ablation_layernorm", "norm_type='layernorm'"), ("ablation_no_qk_norm", "qk_norm=False"),
                        ("ablation_expert_bias", "router_score_function='sigmoid'"),
                        ("ablation_expert_choice", "router_type='expert_choice'")):
        with pytest.raises(ConversionError, match=rf"^ckpt: model.{field} has no HF OLMoE equivalent"):
            check_hf_representable(get_recipe(name).model, source="ckpt")

