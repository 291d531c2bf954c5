"""Fusions and selective recompute as Megatron-Core's own version checks allow them (no GPU, no TE needed)."""

import pytest

from olmoe_megatron.config import ConfigError
from olmoe_megatron.model.megatron_config import fusions, selective_recompute_modules, to_transformer_config
from olmoe_megatron.model.precision import PrecisionConfig, check_fp8_moe_act_recompute
from olmoe_megatron.parallel.layout import ParallelLayout
from olmoe_megatron.recipes import get_recipe

ALL_OFF = {
    "gradient_accumulation_fusion": False, "bias_activation_fusion": False, "bias_dropout_fusion": False,
    "masked_softmax_fusion": False, "persist_layer_norm": False, "cross_entropy_loss_fusion": False,
    "cross_entropy_fusion_impl": "native", "moe_permute_fusion": False, "moe_router_fusion": False,
}


@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("use_te, te_version", [(False, None), (True, "2.10.0")])
def test_cpu_keeps_every_fusion_off(use_te, te_version, bf16):
    assert fusions(on_gpu=False, use_te=use_te, te_version=te_version, bf16=bf16) == ALL_OFF


def test_gpu_without_te_gets_megatrons_native_cross_entropy_only():
    assert fusions(on_gpu=True, use_te=False, te_version=None, bf16=True) == {
        **ALL_OFF, "bias_dropout_fusion": True, "cross_entropy_loss_fusion": True}


def test_gpu_fp32_keeps_the_unfused_cross_entropy():
    """Megatron's native fused cross-entropy casts the logits' gradient to bf16 in its backward."""
    assert fusions(on_gpu=True, use_te=False, te_version=None, bf16=False)["cross_entropy_loss_fusion"] is False


@pytest.mark.parametrize("te_version, permute, router", [
    ("2.0.0", False, False),  # too old for both
    ("2.1.0", True, False),  # fused permutation: TE >= 2.1.0 (moe_utils.permute)
    ("2.6.0", True, False),  # TE's fused router is imported only from 2.7.0.dev
    ("2.7.0.dev0", True, True),
    ("2.9.0", True, True),  # the bottom of setup.py's gpu range
    ("2.11.0+abc", True, True),
])
def test_gpu_with_te_enables_what_the_installed_version_supports(te_version, permute, router):
    got = fusions(on_gpu=True, use_te=True, te_version=te_version, bf16=True)
    assert got == {**ALL_OFF, "gradient_accumulation_fusion": True, "bias_activation_fusion": True,
                   "bias_dropout_fusion": True, "cross_entropy_loss_fusion": True,
                   "moe_permute_fusion": permute, "moe_router_fusion": router}


def test_translation_uses_the_fusions():
    model = get_recipe("olmoe_tiny").model
    bf16 = PrecisionConfig(dtype="bf16", spec="local")
    cpu = to_transformer_config(model, ParallelLayout(), precision=bf16, backend="gloo")
    assert {k: getattr(cpu, k) for k in ALL_OFF} == ALL_OFF
    gpu = to_transformer_config(model, ParallelLayout(), precision=bf16, backend="nccl")  # a GPU without TE
    assert gpu.cross_entropy_loss_fusion is True and gpu.cross_entropy_fusion_impl == "native"
    assert gpu.moe_permute_fusion is False and gpu.moe_router_fusion is False


def test_selective_recompute_includes_moe_act_only_with_grouped_gemm():
    """Megatron-Core refuses moe_act recompute without moe_grouped_gemm (which needs TE)."""
    moe = get_recipe("olmoe_1b_7b").model
    assert selective_recompute_modules(moe, use_te=True) == ["core_attn", "moe_act"]
    assert selective_recompute_modules(moe, use_te=False) == ["core_attn"]
    assert selective_recompute_modules(moe.replace(expert_impl="sequential"), use_te=True) == ["core_attn"]
    assert selective_recompute_modules(get_recipe("ablation_dense").model, use_te=True) == ["core_attn"]


def test_selective_recompute_translates_on_the_local_spec():
    run = get_recipe("olmoe_tiny")
    cfg = to_transformer_config(run.model, ParallelLayout(), precision=run.precision, backend="gloo",
                                recompute="selective")
    assert cfg.recompute_granularity == "selective" and cfg.recompute_modules == ["core_attn"]


@pytest.mark.parametrize("recipe", ["tensorwise", "blockwise"])
@pytest.mark.parametrize("te_version, ok", [("2.5.1", False), ("2.6.0.dev0", True), ("2.6.0", True), ("2.10.0", True)])
def test_fp8_moe_act_recompute_needs_te_2_6(recipe, te_version, ok):
    if ok:
        check_fp8_moe_act_recompute(fp8_recipe=recipe, te_version=te_version)
    else:
        with pytest.raises(ConfigError, match=rf"precision.fp8_recipe='{recipe}' recomputes the MoE activation in "
                                              rf"FP8, which needs transformer-engine>=2.6.0dev0; the installed one is "
                                              rf"{te_version}"):
            check_fp8_moe_act_recompute(fp8_recipe=recipe, te_version=te_version)


@pytest.mark.parametrize("te_version", [None, "2.5.0", "2.10.0"])
def test_fp8_delayed_moe_act_recompute_is_refused_at_any_te_version(te_version):
    with pytest.raises(ConfigError, match=r"precision.fp8_recipe='delayed' with train.recompute='selective'"):
        check_fp8_moe_act_recompute(fp8_recipe="delayed", te_version=te_version)


def test_translation_refuses_fp8_recompute_with_an_old_te_before_megatron_does():
    model = get_recipe("olmoe_1b_7b").model
    precision = PrecisionConfig(dtype="bf16", fp8="e4m3", fp8_recipe="tensorwise")
    with pytest.raises(ConfigError, match=r"needs transformer-engine>=2.6.0dev0; the installed one is 2.5.0"):
        to_transformer_config(model, ParallelLayout(expert_parallel=8), precision=precision, backend="nccl",
                              use_te=True, te_version="2.5.0", recompute="selective")
