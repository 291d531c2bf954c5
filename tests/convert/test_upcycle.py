"""Sparse upcycling: identical experts, zero router, fc2 x E/K -> step 0 reproduces the dense model."""

from __future__ import annotations

import pytest
import torch

from olmoe_megatron.convert import ConversionError, upcycle
from olmoe_megatron.model.config import ModelConfig
from olmoe_megatron.testing.hf_parity import layout_outputs, random_tokens, save_random_model

DENSE = ModelConfig(num_layers=2, d_model=64, num_heads=4, vocab_size=512, padded_vocab_size=512,
                    max_sequence_length=64, num_experts=0, ffn_hidden_size=96)


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    return save_random_model(DENSE, tmp_path_factory.mktemp("dense") / "ckpt", seed=5)


def _logits(model: ModelConfig, ckpt, tokens) -> torch.Tensor:
    return layout_outputs(model.to_dict(), {}, checkpoint=str(ckpt), tokens=tokens)["logits"]


def test_zero_router_reproduces_the_dense_model(dense_ckpt, tmp_path):
    tokens = random_tokens(num_sequences=2, seq_length=16, vocab_size=DENSE.vocab_size)
    dense = _logits(DENSE, dense_ckpt, tokens)
    moe = upcycle(dense_ckpt, tmp_path / "moe", num_experts=8, top_k=2)
    assert (moe.num_experts, moe.top_k, moe.expert_ffn_hidden_size) == (8, 2, 96)
    upcycled = _logits(moe, tmp_path / "moe", tokens)
    assert (upcycled - dense).abs().max().item() <= 1e-5


def test_router_noise_breaks_ties_and_stays_close(dense_ckpt, tmp_path):
    from olmoe_megatron.convert import mcore_io

    tokens = random_tokens(num_sequences=2, seq_length=16, vocab_size=DENSE.vocab_size)
    dense = _logits(DENSE, dense_ckpt, tokens)
    moe = upcycle(dense_ckpt, tmp_path / "noisy", num_experts=4, top_k=2, noise_std=1e-3)
    chunk = mcore_io.build_empty_model(moe, dtype=torch.float32)
    _, layers = mcore_io.group_sharded_by_layer(chunk.sharded_state_dict())
    router = mcore_io.load_entries(tmp_path / "noisy", layers[0], dtype=torch.float32)["decoder.layers.0.mlp.router.weight"]
    assert 0.5e-3 < router.std().item() < 2e-3
    diff = (_logits(moe, tmp_path / "noisy", tokens) - dense).abs().max().item()
    assert 0 < diff < 0.05


def test_upcycling_an_moe_model_is_refused(converted, tmp_path):
    _, _, ckpt = converted["olmoe_tiny"]
    with pytest.raises(ConversionError, match="already an MoE model"):
        upcycle(ckpt, tmp_path / "out", num_experts=8, top_k=2)
    assert not (tmp_path / "out").exists()
