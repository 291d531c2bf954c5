"""Bad input gives an error naming the keys or the file, and nothing appears at the output."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from olmoe_megatron.config import ConfigError
from olmoe_megatron.convert import ConversionError, hf_to_mcore, mcore_to_hf
from olmoe_megatron.convert.errors import atomic_output_dir


@pytest.fixture
def hf_copy(converted, tmp_path):
    _, hf_dir, _ = converted["olmoe_tiny"]
    target = tmp_path / "hf"
    shutil.copytree(hf_dir, target)
    return target


def _rewrite(hf_dir, change) -> None:
    path = hf_dir / "model.safetensors"
    state = load_file(str(path))
    change(state)
    save_file(state, str(path), metadata={"format": "pt"})


def _edit_config(hf_dir, **changes) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(config))


def _assert_nothing_written(out) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_missing_keys_are_listed(hf_copy, tmp_path):
    _rewrite(hf_copy, lambda s: (s.pop("model.layers.1.mlp.experts.3.up_proj.weight"), s.pop("model.norm.weight")))
    with pytest.raises(ConversionError, match=r"missing keys: model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight, model\.norm\.weight"):
        hf_to_mcore(hf_copy, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_extra_keys_are_listed(hf_copy, tmp_path):
    _rewrite(hf_copy, lambda s: s.update({"model.layers.0.mlp.shared_expert.weight": s["model.norm.weight"].clone()}))
    with pytest.raises(ConversionError, match=r"unexpected keys: model\.layers\.0\.mlp\.shared_expert\.weight"):
        hf_to_mcore(hf_copy, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_shape_mismatch_names_keys_and_shapes(hf_copy, tmp_path):
    _edit_config(hf_copy, intermediate_size=48)
    with pytest.raises(ConversionError, match=r"shape mismatches: model\.layers\.0\.mlp\.experts\.0\.down_proj\.weight \(64, 32\) \(expected \(64, 48\)\)"):
        hf_to_mcore(hf_copy, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_other_architecture_is_refused(hf_copy, tmp_path):
    _edit_config(hf_copy, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(ConfigError, match=r"model_type='llama'.*not an OLMoE checkpoint"):
        hf_to_mcore(hf_copy, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_unsupported_olmoe_option_is_refused(hf_copy, tmp_path):
    """More options in test_hf_config.py."""
    _edit_config(hf_copy, norm_topk_prob=True)
    with pytest.raises(ConversionError, match="norm_topk_prob=True is not supported"):
        hf_to_mcore(hf_copy, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_truncated_safetensors_names_the_file(hf_copy, tmp_path):
    path = hf_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=r"cannot read .*model\.safetensors: .*truncated"):
        hf_to_mcore(hf_copy, tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_existing_output_is_not_replaced(converted, tmp_path):
    _, hf_dir, _ = converted["olmoe_tiny"]
    (tmp_path / "out").mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        hf_to_mcore(hf_dir, tmp_path / "out")


def test_not_a_checkpoint_and_wrong_architecture(converted, tmp_path):
    with pytest.raises(ConversionError, match="not a Megatron dist checkpoint"):
        mcore_to_hf(tmp_path, tmp_path / "out")
    model, _, ckpt = converted["olmoe_tiny"]
    wrong = tmp_path / "wrong.yaml"
    from olmoe_megatron.config.base import dump_yaml

    wrong.write_text(dump_yaml(model.replace(expert_ffn_hidden_size=48)))
    with pytest.raises(ConversionError, match=r"shape mismatch .*linear_fc2\.weight: \(4, 8, 64, 32\) \(model: \(4, 8, 64, 48\)\)"):
        mcore_to_hf(ckpt, tmp_path / "out", model_config=wrong)
    _assert_nothing_written(tmp_path / "out")


def test_checkpoint_format_errors_are_conversion_errors(tmp_path):
    """The shared checkpoint format's errors reach the converter's caller as ConversionError."""
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "latest").write_text("step_0000009\n")
    with pytest.raises(ConversionError, match=r"latest names step_0000009, which does not exist"):
        mcore_to_hf(tmp_path / "root", tmp_path / "out")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "metadata.json").write_text("{}")
    with pytest.raises(ConversionError, match=r"no olmoe_model.yaml or olmoe_run.yaml .* pass --model-config PATH"):
        mcore_to_hf(tmp_path / "bare", tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_failure_inside_the_output_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "half.safetensors").write_bytes(b"x")
            raise RuntimeError("killed mid-way")
    _assert_nothing_written(tmp_path / "out")


def test_output_equal_to_inside_or_around_the_input_is_refused(converted, hf_copy, tmp_path):
    """`--out` the input itself (with --overwrite: replaced), inside it, or holding it: refused, the
    input untouched."""
    _, _, ckpt = converted["olmoe_tiny"]
    before = {p.name: p.read_bytes() for p in hf_copy.iterdir() if p.is_file()}
    with pytest.raises(ConversionError, match=r"--out .*hf is the input .*hf: writing it would replace"):
        hf_to_mcore(hf_copy, hf_copy, overwrite=True)
    with pytest.raises(ConversionError, match=r"--out .*hf/mcore lies inside the input"):
        hf_to_mcore(hf_copy, hf_copy / "mcore")
    assert {p.name: p.read_bytes() for p in hf_copy.iterdir() if p.is_file()} == before
    copy = tmp_path / "root" / "step_0000001"
    shutil.copytree(ckpt, copy)
    with pytest.raises(ConversionError, match=r"--out .*root contains the input"):
        mcore_to_hf(copy, tmp_path / "root", overwrite=True)
    assert (copy / "metadata.json").is_file() or any(copy.iterdir())
