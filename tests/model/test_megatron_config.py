"""The one mapping from our configs to Megatron's TransformerConfig, field by field."""

import torch
import torch.nn.functional as F
import pytest

from olmoe_megatron.config import ConfigError
from olmoe_megatron.model.megatron_config import to_transformer_config, truncated_normal_init
from olmoe_megatron.model.precision import PrecisionConfig
from olmoe_megatron.parallel.layout import ParallelLayout
from olmoe_megatron.recipes import get_recipe


def test_olmoe_1b_7b_maps_field_by_field():
    from olmoe_megatron.model.rope import install_cpu_rope

    assert install_cpu_rope()  # the model build's step on CPU
    run = get_recipe("olmoe_1b_7b")
    layout = ParallelLayout(tensor_parallel=2, expert_parallel=8, pipeline_parallel=2, sequence_parallel=True)
    cfg = to_transformer_config(run.model, layout, precision=PrecisionConfig(dtype="bf16", spec="local"), backend="gloo",
                                cpu_rope=True)
    expected = {
        "num_layers": 16, "hidden_size": 2048, "num_attention_heads": 16, "num_query_groups": 16,
        "kv_channels": 128, "ffn_hidden_size": 1024, "normalization": "RMSNorm", "layernorm_epsilon": 1e-5,
        "qk_layernorm": False,  # our spec builds the full-width QK-norm; see megatron_config.py
        "gated_linear_unit": True, "add_bias_linear": False, "add_qkv_bias": False,
        "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "num_moe_experts": 64, "moe_router_topk": 8, "moe_ffn_hidden_size": 1024,
        "moe_router_score_function": "softmax", "moe_router_pre_softmax": True, "moe_router_dtype": "fp32",
        "moe_router_topk_scaling_factor": None, "moe_router_load_balancing_type": "aux_loss",
        "moe_aux_loss_coeff": 6.25e-4, "moe_z_loss_coeff": 7.8125e-6, "moe_token_dispatcher_type": "alltoall",
        "moe_shared_expert_intermediate_size": None, "moe_grouped_gemm": False,
        "params_dtype": torch.bfloat16, "pipeline_dtype": torch.bfloat16, "bf16": True, "fp16": False,
        "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2, "expert_model_parallel_size": 8,
        "expert_tensor_parallel_size": 2, "context_parallel_size": 1, "sequence_parallel": True,
        "gradient_accumulation_fusion": False, "apply_rope_fusion": True, "masked_softmax_fusion": False,
        "bias_activation_fusion": False, "persist_layer_norm": False, "cross_entropy_loss_fusion": False,
        "use_cpu_initialization": True, "batch_p2p_comm": True, "recompute_granularity": None,
        "cuda_graph_scope": [],
    }
    for field, value in expected.items():
        assert getattr(cfg, field) == pytest.approx(value) if isinstance(value, float) else getattr(cfg, field) == value, field
    assert cfg.activation_func is F.silu


def test_init_is_truncated_normal_without_depth_scaling():
    run = get_recipe("olmoe_1b_7b")
    cfg = to_transformer_config(run.model, ParallelLayout(), precision=PrecisionConfig(dtype="fp32"), backend="gloo")
    for init in (cfg.init_method, cfg.output_layer_init_method, cfg.embedding_init_method):
        assert init.keywords == {"mean": 0.0, "std": 0.02, "a": -0.06, "b": 0.06}
    weight = torch.empty(512, 512)
    torch.manual_seed(0)
    truncated_normal_init(0.02, 3.0)(weight)
    assert weight.abs().max() <= 0.06 and weight.std().item() == pytest.approx(0.01973, rel=0.02)  # std of N(0, .02) cut at 3 sd


def test_loss_switches_and_interleaved_pipeline_over_gloo():
    model = get_recipe("ablation_no_lb").model.replace(router_z_loss_coeff=0.0)
    layout = ParallelLayout(pipeline_parallel=2, virtual_pipeline_parallel=2)
    cfg = to_transformer_config(model, layout, precision=PrecisionConfig(dtype="fp32"), backend="gloo")
    assert cfg.moe_router_load_balancing_type == "none" and cfg.moe_z_loss_coeff is None
    assert cfg.batch_p2p_comm is False and cfg.overlap_p2p_comm is True


def test_fp8_needs_te_and_bf16():
    with pytest.raises(ConfigError, match=r"precision.fp8='e4m3' needs Transformer Engine layers; set precision.spec=te"):
        PrecisionConfig(fp8="e4m3", spec="local")
    with pytest.raises(ConfigError, match=r"precision.dtype='fp32': FP8 runs inside a bf16 model"):
        PrecisionConfig(fp8="hybrid", dtype="fp32")


cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


@cpu_only
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise"])
def test_fp8_without_a_gpu_is_refused(recipe):
    with pytest.raises(ConfigError, match=r"precision.fp8='e4m3' needs Transformer Engine on a CUDA GPU: no CUDA device"):
        PrecisionConfig(fp8="e4m3", fp8_recipe=recipe).use_te()


@cpu_only
def test_spec_choice_without_a_gpu():
    assert PrecisionConfig(spec="auto").use_te() is False
    assert PrecisionConfig(spec="local").use_te() is False
    with pytest.raises(ConfigError, match=r"precision.spec=te needs Transformer Engine on a CUDA GPU: no CUDA device"):
        PrecisionConfig(spec="te").use_te()


@pytest.mark.gpu
def test_spec_choice_on_a_gpu():
    """auto means TE exactly when TE imports; te without TE is refused naming the import problem."""
    from olmoe_megatron.model.precision import transformer_engine_status

    te_ok, why = transformer_engine_status()
    assert PrecisionConfig(spec="auto").use_te() is te_ok
    assert PrecisionConfig(spec="local").use_te() is False
    if te_ok:
        assert PrecisionConfig(spec="te").use_te() is True
    else:
        with pytest.raises(ConfigError, match=r"precision.spec=te needs Transformer Engine on a CUDA GPU: transformer_engine"):
            PrecisionConfig(spec="te").use_te()


def test_cpu_rope_is_a_translation_input_not_a_side_effect():
    """In a fresh interpreter (nothing built yet): translating a config fills no Megatron slot."""
    import subprocess
    import sys

    code = (
        "from megatron.core.models.common.embeddings import rope_utils\n"
        "from olmoe_megatron.model.megatron_config import to_transformer_config\n"
        "from olmoe_megatron.parallel.layout import ParallelLayout\n"
        "from olmoe_megatron.recipes import get_recipe\n"
        "run = get_recipe('olmoe_tiny')\n"
        "assert rope_utils.fused_apply_rotary_pos_emb is None\n"
        "cfg = to_transformer_config(run.model, ParallelLayout(), precision=run.precision, backend='gloo')\n"
        "print(cfg.apply_rope_fusion, rope_utils.fused_apply_rotary_pos_emb is None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_te_spec_without_te_gives_a_clear_error():
    from olmoe_megatron.model.spec import te_backend

    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match=r"^precision.spec=te needs Transformer Engine: pip install 'olmoe-megatron\[gpu\]'"):
            te_backend()
    else:
        pytest.skip("Transformer Engine is installed here")
