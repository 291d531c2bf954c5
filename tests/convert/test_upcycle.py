"""Sparse upcycling: OLMoE's method (unscaled expert copies, router N(0, 0.02)) by default; the
function-preserving option (fc2 x E/K, zero router) reproduces the dense model at step 0."""

from __future__ import annotations

import json

import pytest
import torch

from olmoe_megatron.checkpoint.manifest import verify
from olmoe_megatron.convert import ConversionError, upcycle
from olmoe_megatron.convert.upcycle import UPCYCLE_FILE, upcycled_config
from olmoe_megatron.model.config import ModelConfig
from olmoe_megatron.testing.hf_parity import layout_outputs, random_tokens, save_random_model

DENSE = ModelConfig(num_layers=2, d_model=64, num_heads=4, vocab_size=512, padded_vocab_size=512,
                    max_sequence_length=64, num_experts=0, ffn_hidden_size=96)


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    return save_random_model(DENSE, tmp_path_factory.mktemp("dense") / "ckpt", seed=5)


def _logits(model: ModelConfig, ckpt, tokens) -> torch.Tensor:
    return layout_outputs(model.to_dict(), {}, checkpoint=str(ckpt), tokens=tokens)["logits"]


def _weights(model: ModelConfig, ckpt) -> dict[str, torch.Tensor]:
    from olmoe_megatron.convert import mcore_io

    chunk = mcore_io.build_empty_model(model, dtype=torch.float32)
    _, layers = mcore_io.group_sharded_by_layer(chunk.sharded_state_dict())
    out: dict[str, torch.Tensor] = {}
    for entries in layers.values():
        out.update(mcore_io.load_entries(ckpt, entries, dtype=torch.float32))
    return out


def test_default_is_olmoes_method(dense_ckpt, tmp_path):
    """Every expert the dense MLP exactly (unscaled); router N(0, 0.02), seeded and recorded."""
    moe = upcycle(dense_ckpt, tmp_path / "a", num_experts=8, top_k=2)
    assert verify(tmp_path / "a")[1] == []  # a manifest of everything it wrote
    assert (moe.num_experts, moe.top_k, moe.expert_ffn_hidden_size) == (8, 2, 96)
    dense, upcycled = _weights(DENSE, dense_ckpt), _weights(moe, tmp_path / "a")
    routers = []
    for i in range(DENSE.num_layers):
        prefix = f"decoder.layers.{i}.mlp."
        for e in range(8):
            for name in ("linear_fc1", "linear_fc2"):
                expert = upcycled[prefix + f"experts.local_experts.{e}.{name}.weight"]
                assert torch.equal(expert, dense[prefix + f"{name}.weight"])
        routers.append(upcycled[prefix + "router.weight"])
    router = torch.stack(routers)
    assert router.shape == (2, 8, DENSE.d_model)
    assert router.std().item() == pytest.approx(0.02, rel=0.05) and abs(router.mean().item()) < 2e-3
    # Untruncated, as OLMoE's torch.nn.init.normal_: some of 2048 draws lie beyond 3 std.
    assert router.abs().max().item() > 0.06
    assert not torch.equal(routers[0], routers[1])
    record = json.loads((tmp_path / "a" / UPCYCLE_FILE).read_text())
    assert {k: record[k] for k in ("method", "router_std", "seed", "expert_fc2_scale")} == \
        {"method": "olmoe", "router_std": 0.02, "seed": 0, "expert_fc2_scale": 1.0}

    upcycle(dense_ckpt, tmp_path / "b", num_experts=8, top_k=2)
    upcycle(dense_ckpt, tmp_path / "c", num_experts=8, top_k=2, seed=1)
    again, other = _weights(moe, tmp_path / "b"), _weights(moe, tmp_path / "c")
    key = "decoder.layers.0.mlp.router.weight"
    assert torch.equal(again[key], upcycled[key]) and not torch.equal(other[key], upcycled[key])


def test_function_preserving_reproduces_the_dense_model(dense_ckpt, tmp_path):
    tokens = random_tokens(num_sequences=2, seq_length=16, vocab_size=DENSE.vocab_size)
    dense = _logits(DENSE, dense_ckpt, tokens)
    moe = upcycle(dense_ckpt, tmp_path / "moe", num_experts=8, top_k=2, method="function_preserving")
    assert (moe.num_experts, moe.top_k, moe.expert_ffn_hidden_size) == (8, 2, 96)
    upcycled = _logits(moe, tmp_path / "moe", tokens)
    assert (upcycled - dense).abs().max().item() <= 1e-5


def test_function_preserving_router_noise_breaks_ties_and_stays_close(dense_ckpt, tmp_path):
    tokens = random_tokens(num_sequences=2, seq_length=16, vocab_size=DENSE.vocab_size)
    dense = _logits(DENSE, dense_ckpt, tokens)
    moe = upcycle(dense_ckpt, tmp_path / "noisy", num_experts=4, top_k=2, method="function_preserving",
                  router_std=1e-3)
    router = _weights(moe, tmp_path / "noisy")["decoder.layers.0.mlp.router.weight"]
    assert 0.5e-3 < router.std().item() < 2e-3
    diff = (_logits(moe, tmp_path / "noisy", tokens) - dense).abs().max().item()
    assert 0 < diff < 0.05


def test_cli_defaults_to_olmoes_method(dense_ckpt, tmp_path):
    from olmoe_megatron.launcher.cli import main

    args = ["convert", "upcycle", "--dense", str(dense_ckpt), "--num-experts", "4", "--top-k", "2"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--method", "function_preserving", "--seed", "3"]) == 0
    records = [json.loads((tmp_path / name / UPCYCLE_FILE).read_text()) for name in ("a", "b")]
    assert [(r["method"], r["router_std"], r["seed"], r["expert_fc2_scale"]) for r in records] == \
        [("olmoe", 0.02, 0, 1.0), ("function_preserving", 0.0, 3, 2.0)]


def test_bad_method_and_std_are_refused(dense_ckpt, tmp_path):
    with pytest.raises(ConversionError, match=r"--method='mean' is not an upcycling method; use one of olmoe"):
        upcycle(dense_ckpt, tmp_path / "out", num_experts=8, top_k=2, method="mean")
    with pytest.raises(ConversionError, match=r"--router-std=-0.1 must be >= 0"):
        upcycle(dense_ckpt, tmp_path / "out", num_experts=8, top_k=2, router_std=-0.1)
    with pytest.raises(ConversionError, match=r"--num-experts=0 must be at least 1"):
        upcycle(dense_ckpt, tmp_path / "out", num_experts=0, top_k=1)
    with pytest.raises(ConversionError, match=r"--top-k=9 must be between 1 and --num-experts=8"):
        upcycle(dense_ckpt, tmp_path / "out", num_experts=8, top_k=9)
    assert not (tmp_path / "out").exists()


def test_upcycling_an_moe_model_is_refused(converted, tmp_path):
    _, _, ckpt = converted["olmoe_tiny"]
    with pytest.raises(ConversionError, match="already an MoE model"):
        upcycle(ckpt, tmp_path / "out", num_experts=8, top_k=2)
    assert not (tmp_path / "out").exists()


def test_upcycled_ablation_dense_is_the_ablation_upcycled_model():
    """`olmoe convert upcycle --num-experts 8 --top-k 1` of an ablation_dense checkpoint writes
    exactly the model ablation_upcycled trains (checkpoint.init_from loads it shape for shape)."""
    from olmoe_megatron.recipes import get_recipe

    dense = get_recipe("ablation_dense")
    upcycled = get_recipe("ablation_upcycled")
    assert upcycled_config(dense.model, num_experts=8, top_k=1) == upcycled.model
    # Nothing else differs but where it starts from: the upcycled checkpoint, never initialisation.
    assert upcycled.replace(name=dense.name, model=dense.model, checkpoint=dense.checkpoint) == dense
    assert upcycled.checkpoint.init_from == "runs/ablation_upcycled/upcycled_dense" and upcycled.checkpoint.dir
    assert upcycled.model.num_params(active=True) < upcycled.model.num_params()
    assert upcycled.model.num_params(active=True) - dense.model.num_params() == \
        upcycled.model.num_layers * upcycled.model.d_model * 8  # the routers
