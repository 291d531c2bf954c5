"""HF -> ours -> HF is bit-exact (also from a checkpoint saved with EP > 1), fused HF input, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from olmoe_megatron.checkpoint.manifest import verify
from olmoe_megatron.convert import hf_to_mcore, mcore_to_hf
from olmoe_megatron.convert.safetensors_io import HFReader
from olmoe_megatron.testing.distributed import get_pool
from olmoe_megatron.testing.hf_parity import layout_outputs, make_hf_checkpoint, random_tokens


def _hf_state(directory) -> dict[str, torch.Tensor]:
    reader = HFReader(directory)
    return reader.read(reader.key_file)


def _assert_bit_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def test_hf_to_ours_to_hf_is_bit_exact(converted, tmp_path):
    for name, (model, hf_dir, ckpt) in converted.items():
        assert verify(ckpt)[1] == [], name  # the converter wrote a manifest of everything it wrote
        mcore_to_hf(ckpt, tmp_path / name)
        _assert_bit_equal(_hf_state(hf_dir), _hf_state(tmp_path / name))
        # config.json and generation_config.json (via hf_tokenizer/) come back byte for byte.
        for file in ("config.json", "generation_config.json"):
            assert (tmp_path / name / file).read_bytes() == (hf_dir / file).read_bytes(), file
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["vocab_size"] == model.padded_vocab_size and config["num_experts"] == model.num_experts


def test_export_from_checkpoint_saved_with_ep2_is_bit_exact(converted, tmp_path):
    model, hf_dir, ckpt = converted["olmoe_small"]
    tokens = random_tokens(num_sequences=1, seq_length=4, vocab_size=model.vocab_size)
    saved = tmp_path / "ep2"
    pool = get_pool(2)
    try:
        pool.run(layout_outputs, model.to_dict(), {"expert_parallel": 2}, checkpoint=str(ckpt), tokens=tokens,
                 save_to=str(saved))
    finally:
        pool.close()
    (saved / "olmoe_model.yaml").write_text((ckpt / "olmoe_model.yaml").read_text())
    mcore_to_hf(saved, tmp_path / "hf")
    _assert_bit_equal(_hf_state(hf_dir), _hf_state(tmp_path / "hf"))


def test_fused_expert_input_gives_the_same_checkpoint(converted, tmp_path):
    model, hf_dir, _ = converted["olmoe_tiny"]
    fused = make_hf_checkpoint(model, tmp_path / "fused", seed=1, fused=True)
    assert any(k.endswith("experts.gate_up_proj") for k in HFReader(fused).key_file)
    hf_to_mcore(fused, tmp_path / "ckpt")
    mcore_to_hf(tmp_path / "ckpt", tmp_path / "back")
    _assert_bit_equal(_hf_state(hf_dir), _hf_state(tmp_path / "back"))


def test_vocab_padding_adds_zero_rows_and_export_drops_them(tmp_path):
    from olmoe_megatron.recipes import get_recipe

    model = get_recipe("olmoe_tiny").model.replace(vocab_size=1000, padded_vocab_size=1000, num_layers=1)
    hf_dir = make_hf_checkpoint(model, tmp_path / "hf")
    converted = hf_to_mcore(hf_dir, tmp_path / "ckpt")
    assert (converted.vocab_size, converted.padded_vocab_size) == (1000, 1024)
    mcore_to_hf(tmp_path / "ckpt", tmp_path / "padded", vocab_rows="padded")
    padded = _hf_state(tmp_path / "padded")["lm_head.weight"]
    assert padded.shape[0] == 1024 and not padded[1000:].any()
    assert json.loads((tmp_path / "padded" / "config.json").read_text())["vocab_size"] == 1024
    mcore_to_hf(tmp_path / "ckpt", tmp_path / "trimmed")  # default: the imported config's 1000 rows
    _assert_bit_equal(_hf_state(hf_dir), _hf_state(tmp_path / "trimmed"))
    assert (tmp_path / "trimmed" / "config.json").read_bytes() == (hf_dir / "config.json").read_bytes()


def test_cli_round_trip_follows_latest(converted, tmp_path):
    from olmoe_megatron.launcher.cli import main

    _, hf_dir, _ = converted["olmoe_tiny"]
    root = tmp_path / "train"
    assert main(["convert", "hf-to-mcore", "--hf", str(hf_dir), "--out", str(root / "step_0000000"),
                 "--layout", "tp=2,pp=2,ep=2"]) == 0
    (root / "latest").write_text("step_0000000\n")
    assert main(["convert", "mcore-to-hf", "--ckpt", str(root), "--out", str(tmp_path / "hf")]) == 0
    _assert_bit_equal(_hf_state(hf_dir), _hf_state(tmp_path / "hf"))
    assert main(["convert", "hf-to-mcore", "--hf", str(hf_dir), "--out", str(tmp_path / "x"),
                 "--layout", "ep=3"]) == 2  # 3 does not divide 8 experts: a config error
    assert not (tmp_path / "x").exists()
