"""ParallelLayout rules, checked without any process group."""

import pytest

from olmoe_megatron.config import ConfigError
from olmoe_megatron.parallel.layout import ParallelLayout
from olmoe_megatron.recipes import get_recipe

OLMOE = get_recipe("olmoe_1b_7b").model
TINY = get_recipe("olmoe_tiny").model


def test_derived_degrees():
    layout = ParallelLayout(tensor_parallel=2, pipeline_parallel=2, expert_parallel=4, sequence_parallel=True)
    assert layout.data_parallel_size(32) == 8
    assert layout.expert_data_parallel_size(32) == 2  # etp defaults to tp: 32 / (2 * 4 * 2)
    assert ParallelLayout(tensor_parallel=2, expert_tensor_parallel=1, expert_parallel=2,
                          sequence_parallel=True).expert_data_parallel_size(4) == 2
    layout.validate(OLMOE, 32)
    assert layout.smallest_world_size == 16  # lcm(tp*pp*cp = 4, etp*ep*pp = 16)
    assert ParallelLayout(tensor_parallel=2, pipeline_parallel=3, expert_parallel=2, expert_tensor_parallel=1,
                          sequence_parallel=True).smallest_world_size == 6  # lcm(6, 6)


@pytest.mark.parametrize(
    "layout, world, message",
    [
        (dict(expert_parallel=3), 6, r"parallel.expert_parallel=3 must divide model.num_experts=64; use one of 1, 2, 4, 8, 16, 32 or 64"),
        (dict(tensor_parallel=3), 3, r"parallel.tensor_parallel=3 must divide model.num_heads=16; use one of 1, 2, 4, 8 or 16"),
        (dict(tensor_parallel=2), 2, r"parallel.sequence_parallel=false with parallel.tensor_parallel=2.*set parallel.sequence_parallel=true"),
        (dict(pipeline_parallel=3), 3, r"model.num_layers=16 must be divisible by pipeline_parallel\*virtual_pipeline_parallel=3\*1=3"),
        (dict(pipeline_parallel=4, virtual_pipeline_parallel=8), 4, r"=4\*8=32"),
        (dict(tensor_parallel=2, sequence_parallel=True), 3, r"world_size=3 must be a multiple of tensor_parallel\*pipeline_parallel\*context_parallel=2\*1\*1=2"),
        (dict(expert_parallel=8), 4, r"world_size=4 must be a multiple of expert_tensor_parallel\*expert_parallel\*pipeline_parallel=1\*8\*1=8"),
        (dict(tensor_parallel=2, sequence_parallel=True, expert_tensor_parallel=3), 6, r"expert_tensor_parallel=3 must divide model.expert_ffn_hidden_size=1024"),
    ],
)
def test_megatron_rules_name_field_value_and_fix(layout, world, message):
    with pytest.raises(ConfigError, match=message):
        ParallelLayout(**layout).validate(OLMOE, world)


def test_own_rules_checked_on_construction():
    with pytest.raises(ConfigError, match=r"parallel.sequence_parallel=true needs parallel.tensor_parallel > 1"):
        ParallelLayout(sequence_parallel=True)
    with pytest.raises(ConfigError, match=r"virtual_pipeline_parallel=2 needs parallel.pipeline_parallel > 1"):
        ParallelLayout(virtual_pipeline_parallel=2)
    with pytest.raises(ConfigError, match=r"parallel.rank_order='tp-dp-pp'"):
        ParallelLayout(rank_order="tp-dp-pp")
    with pytest.raises(ConfigError, match=r"parallel.tensor_parallel=0 must be >= 1"):
        ParallelLayout(tensor_parallel=0)


def test_vocab_padding_must_split_over_tp():
    model = TINY.replace(padded_vocab_size=50306, vocab_size=50280)
    with pytest.raises(ConfigError, match=r"model.padded_vocab_size=50306 must be divisible by parallel.tensor_parallel=4"):
        ParallelLayout(tensor_parallel=4, sequence_parallel=True).validate(model, 4)


def test_interleaved_pipeline_over_gloo_never_batches_p2p():
    """Megatron's default batch_p2p_comm=True gives wrong gradients over gloo with VPP."""
    vpp = ParallelLayout(pipeline_parallel=2, virtual_pipeline_parallel=2)
    assert vpp.use_batch_p2p_comm(backend="gloo") is False
    assert vpp.use_batch_p2p_comm(backend="nccl") is True
    assert ParallelLayout(pipeline_parallel=2).use_batch_p2p_comm(backend="gloo") is True
    with pytest.raises(ConfigError, match=r"batch_p2p_comm=true with parallel.virtual_pipeline_parallel=2 over gloo"):
        vpp.replace(batch_p2p_comm=True).validate(TINY, 2, backend="gloo")
    vpp.replace(batch_p2p_comm=True).validate(TINY, 2, backend="nccl")


def test_context_parallel_needs_te_attention_on_cpu():
    with pytest.raises(ConfigError, match=r"parallel.context_parallel=2 needs Transformer Engine"):
        ParallelLayout(context_parallel=2).validate(TINY, 2, backend="gloo")


def test_dense_model_rejects_expert_parallel():
    dense = get_recipe("ablation_dense").model
    with pytest.raises(ConfigError, match=r"parallel.expert_parallel=2 needs an MoE model"):
        ParallelLayout(expert_parallel=2).validate(dense, 2)
