"""OLMoE-1B-7B's numbers, the ablation recipes' budgets, and the loss-coefficient conversion."""

import pytest

from olmoe_megatron.config import ConfigError
from olmoe_megatron.model.config import ModelConfig
from olmoe_megatron.recipes import get_recipe


def test_olmoe_1b_7b_parameter_counts_match_the_paper():
    model = get_recipe("olmoe_1b_7b").model
    assert model.attention_params_per_layer() == 16_781_312  # 16.78M (qkv + out + full-width QK-norm)
    assert model.num_experts * model.expert_params() == 402_653_184  # 402.65M
    assert model.d_model * model.num_experts == 131_072  # router 0.13M
    assert model.padded_vocab_size * model.d_model == 103_022_592  # embedding and lm head, 103.0M each
    assert model.num_params() / 6.919e9 == pytest.approx(1.0, rel=5e-3)
    assert model.num_params(active=True) / 1.282e9 == pytest.approx(1.0, rel=5e-3)
    # ~8.7 GFLOP per token at seq 4096 (OLMOE_FACTS.md throughput anchors)
    assert model.flops_per_token(4096) / 8.7e9 == pytest.approx(1.0, rel=0.01)


def test_olmoe_coefficients_convert_to_megatron_per_layer_ones():
    model = get_recipe("olmoe_1b_7b").model
    assert model.megatron_aux_loss_coeff == pytest.approx(6.25e-4)
    assert model.megatron_z_loss_coeff == pytest.approx(7.8125e-6)


def test_granularity_ablations_keep_active_and_total_parameters():
    runs = [get_recipe(n) for n in ("ablation_8e_top1", "ablation_32e_top4", "ablation_64e_top8")]
    totals = {r.model.num_params() - r.model.d_model * r.model.num_experts * r.model.num_layers for r in runs}
    actives = {r.model.num_params(active=True) - r.model.d_model * r.model.num_experts * r.model.num_layers for r in runs}
    assert len(totals) == 1 and len(actives) == 1  # equal once the (tiny) routers are set aside
    dense = get_recipe("ablation_dense").model
    assert dense.num_params(active=True) == next(iter(actives))
    shared = get_recipe("ablation_shared_expert").model  # 1 shared + top-3 of 32, against 32 top-4
    assert shared.num_params(active=True) == get_recipe("ablation_32e_top4").model.num_params(active=True)
    assert shared.num_params(active=True) - shared.d_model * shared.num_experts * shared.num_layers == next(iter(actives))
    assert get_recipe("ablation_no_lb").model.router_aux_loss_coeff == 0
    assert get_recipe("ablation_no_zloss").model.router_z_loss_coeff == 0


def test_small_recipe_is_the_cpu_benchmark_size():
    m = get_recipe("olmoe_small").model
    assert (m.num_layers, m.d_model, m.num_heads, m.num_experts, m.top_k, m.expert_ffn_hidden_size,
            m.vocab_size) == (4, 256, 4, 16, 4, 128, 4096)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"d_model": 100, "num_heads": 16}, r"model.d_model=100 must be divisible by model.num_heads=16"),
        ({"num_kv_heads": 3}, r"model.num_kv_heads=3 must divide model.num_heads=16"),
        ({"padded_vocab_size": 50000}, r"model.padded_vocab_size=50000 must be >= model.vocab_size=50280; use 50304"),
        ({"num_shared_experts": 2}, r"model.num_shared_experts=2 must be 0 or 1"),
        ({"init_cutoff_stds": 0}, r"model.init_cutoff_stds=0 must be > 0"),
    ],
)
def test_model_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**changes)
