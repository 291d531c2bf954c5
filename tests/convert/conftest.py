"""Shared fixtures: random HF checkpoints of olmoe_tiny and olmoe_small, converted once per session."""

from __future__ import annotations

import warnings

import pytest

warnings.filterwarnings("ignore")


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """{recipe: (ModelConfig, hf_dir, ckpt_dir)} converted in this (world-of-one) process."""
    from olmoe_megatron.convert import hf_to_mcore
    from olmoe_megatron.recipes import get_recipe
    from olmoe_megatron.testing.hf_parity import make_hf_checkpoint

    out = {}
    for name in ("olmoe_tiny", "olmoe_small"):
        root = tmp_path_factory.mktemp(name)
        hf_dir = make_hf_checkpoint(get_recipe(name).model, root / "hf", seed=1)
        model = hf_to_mcore(hf_dir, root / "ckpt")
        out[name] = (model, hf_dir, root / "ckpt")
    return out
