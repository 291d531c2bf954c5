"""HF -> ours -> HF gives back config.json (and generation_config.json) byte for byte and the
weights bit for bit, over varied valid OlmoeConfigs; what our model cannot represent is refused at
import; a model config that contradicts the stored HF config is refused at export."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from olmoe_megatron.config.base import dump_yaml, load_yaml
from olmoe_megatron.convert import ConversionError, hf_to_mcore, mcore_to_hf
from olmoe_megatron.convert.hf_config import FIELDS, HF_CONFIG_FILE
from olmoe_megatron.convert.safetensors_io import HFReader
from olmoe_megatron.model.config import ModelConfig

TINY = dict(hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, num_experts=4,
            num_experts_per_tok=2, max_position_embeddings=64)

#: Valid OlmoeConfigs (transformers 5 writes them), each a different corner of what config.json holds.
CONFIGS = {
    "vocab_1000_no_token_ids": dict(TINY, vocab_size=1000, eos_token_id=None, bos_token_id=None, pad_token_id=None,
                                    rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "olmoe_token_ids": dict(TINY, vocab_size=50304, eos_token_id=50279, pad_token_id=1, bos_token_id=None),
    "gqa_eos_list": dict(TINY, vocab_size=384, num_key_value_heads=2, bos_token_id=0,
                                  eos_token_id=[1, 2], pad_token_id=3, rms_norm_eps=1e-6, initializer_range=0.01,
                                  router_aux_loss_coef=0.02, norm_topk_prob=False),
    "bf16_top1_runtime_switches": dict(TINY, vocab_size=515, num_experts=2, num_experts_per_tok=1, use_cache=False,
                                       output_router_logits=True, attention_dropout=0.0, tie_word_embeddings=False,
                                       max_position_embeddings=128, dtype="bfloat16"),
}


def _save_hf(kwargs: dict, directory, *, seed: int = 0):
    """A random OlmoeForCausalLM with this config, saved by save_pretrained (norms randomised too)."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    kwargs = dict(kwargs)
    dtype = getattr(torch, kwargs.pop("dtype", "float32"))
    torch.manual_seed(seed)
    model = OlmoeForCausalLM(OlmoeConfig(**kwargs)).to(dtype).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    return directory


def _state(directory) -> dict[str, torch.Tensor]:
    reader = HFReader(directory)
    return reader.read(reader.key_file)


def _assert_same_weights(a, b) -> None:
    a, b = _state(a), _state(b)
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    assert not [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]


def _assert_same_files(a, b) -> None:
    for name in ("config.json", "generation_config.json"):
        if (a / name).is_file():
            assert json.loads((b / name).read_text()) == json.loads((a / name).read_text()), name
            assert (b / name).read_bytes() == (a / name).read_bytes(), name


def _config(directory) -> dict:
    return json.loads((directory / "config.json").read_text())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_exact(name, tmp_path):
    hf = _save_hf(CONFIGS[name], tmp_path / "hf")
    assert (hf / "generation_config.json").is_file()
    hf_to_mcore(hf, tmp_path / "ckpt")
    mcore_to_hf(tmp_path / "ckpt", tmp_path / "back")
    _assert_same_files(hf, tmp_path / "back")
    _assert_same_weights(hf, tmp_path / "back")


def test_transformers_4_config_comes_back_verbatim(tmp_path):
    """A config.json in transformers 4's spelling (rope_theta, rope_scaling, torch_dtype), laid out
    by hand: written back byte for byte, though we would spell it otherwise."""
    hf = _save_hf(dict(TINY, vocab_size=640, rope_parameters={"rope_type": "default", "rope_theta": 20000.0}),
                  tmp_path / "hf")
    v4 = {"model_type": "olmoe", "architectures": ["OlmoeForCausalLM"], "vocab_size": 640, **TINY,
          "rope_theta": 20000.0, "rope_scaling": None, "torch_dtype": "float32", "transformers_version": "4.46.0",
          "clip_qkv": None, "attention_bias": False, "num_key_value_heads": 4, "pad_token_id": 1,
          "eos_token_id": 50279, "bos_token_id": None, "hidden_act": "silu"}
    (hf / "config.json").write_text(json.dumps(v4, indent=4))
    hf_to_mcore(hf, tmp_path / "ckpt")
    mcore_to_hf(tmp_path / "ckpt", tmp_path / "back")
    _assert_same_files(hf, tmp_path / "back")
    _assert_same_weights(hf, tmp_path / "back")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(hf_dir, checkpoint) of one import, shared by the tests that change the checkpoint's copy."""
    root = tmp_path_factory.mktemp("imported")
    hf = _save_hf(CONFIGS["vocab_1000_no_token_ids"], root / "hf")
    hf_to_mcore(hf, root / "ckpt")
    return hf, root / "ckpt"


def _edited_copy(ckpt, target, **changes):
    shutil.copytree(ckpt, target)
    model = load_yaml(ModelConfig, target / "olmoe_model.yaml")
    (target / "olmoe_model.yaml").write_text(dump_yaml(model.replace(**changes)))
    return target


def test_model_contradicting_the_stored_config_is_refused(imported, tmp_path):
    hf, ckpt = imported
    edited = _edited_copy(ckpt, tmp_path / "edited", rope_theta=10000.0)
    with pytest.raises(ConversionError, match=r"the model config says rope_theta=10000\.0 but the HF config it was "
                       r"imported from \(.*hf_config\.json\) has rope_theta=500000\.0.*Restore the model config.*"
                       r"--hf-config model"):
        mcore_to_hf(edited, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # The fix the message names (through the CLI): config.json built from the model config as it is now.
    from olmoe_megatron.launcher.cli import main

    assert main(["convert", "mcore-to-hf", "--ckpt", str(edited), "--out", str(tmp_path / "out")]) == 2
    assert main(["convert", "mcore-to-hf", "--ckpt", str(edited), "--out", str(tmp_path / "out"),
                 "--hf-config", "model"]) == 0
    config = _config(tmp_path / "out")
    assert config["rope_theta"] == 10000.0 and config["vocab_size"] == 1024 and config["eos_token_id"] is None


def test_training_settings_are_written_from_the_model(imported, tmp_path):
    """max_sequence_length (and the aux-loss weight) are training choices: the export takes the model's."""
    hf, ckpt = imported
    edited = _edited_copy(ckpt, tmp_path / "edited", max_sequence_length=256, router_aux_loss_coeff=0.05)
    mcore_to_hf(edited, tmp_path / "out")
    assert _config(tmp_path / "out") == {**_config(hf), "max_position_embeddings": 256, "router_aux_loss_coef": 0.05}
    _assert_same_weights(hf, tmp_path / "out")


def test_padded_rows_on_request_and_dtype_after_a_cast(imported, tmp_path):
    hf, ckpt = imported
    mcore_to_hf(ckpt, tmp_path / "padded", vocab_rows="padded")
    assert _config(tmp_path / "padded") == {**_config(hf), "vocab_size": 1024}
    assert _state(tmp_path / "padded")["lm_head.weight"].shape[0] == 1024
    hf_to_mcore(hf, tmp_path / "bf16", dtype="bf16")
    mcore_to_hf(tmp_path / "bf16", tmp_path / "bf16_hf")
    assert _config(tmp_path / "bf16_hf") == {**_config(hf), "dtype": "bfloat16"}
    source, back = _state(hf), _state(tmp_path / "bf16_hf")
    assert all(torch.equal(source[k].to(torch.bfloat16), back[k]) for k in source)


def test_training_checkpoint_takes_the_config_through_init_from(imported, tmp_path):
    """A run started from an imported checkpoint (checkpoint.init_from) exports with its HF config."""
    from olmoe_megatron.checkpoint.format import write_run_config
    from olmoe_megatron.recipes import get_recipe

    hf, ckpt = imported
    model = load_yaml(ModelConfig, ckpt / "olmoe_model.yaml")
    recipe = get_recipe("olmoe_tiny")
    run = recipe.replace(model=model, train=dataclasses.replace(recipe.train, seq_length=32),
                         checkpoint=dataclasses.replace(recipe.checkpoint, dir=str(tmp_path / "run"), init_from=str(ckpt)))
    step = tmp_path / "run" / "step_0000003"
    shutil.copytree(ckpt, step, ignore=shutil.ignore_patterns("hf_*", "olmoe_model.yaml"))
    write_run_config(step, run)
    (tmp_path / "run" / "latest").write_text("step_0000003\n")
    mcore_to_hf(tmp_path / "run", tmp_path / "out")
    _assert_same_files(hf, tmp_path / "out")
    _assert_same_weights(hf, tmp_path / "out")


#: (config.json change, the message it must give)
REFUSED = {
    "clip_qkv": ({"clip_qkv": 8.0}, r"clip_qkv=8\.0 is not supported: our attention does not clip"),
    "attention_bias": ({"attention_bias": True}, r"attention_bias=True is not supported: our attention projections have no biases"),
    "norm_topk_prob": ({"norm_topk_prob": True}, r"norm_topk_prob=True is not supported: our router does not renormalise"),
    "tie_word_embeddings": ({"tie_word_embeddings": True}, r"tie_word_embeddings=True is not supported.*untie it first"),
    "hidden_act": ({"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported: our experts are SwiGLU"),
    "attention_dropout": ({"attention_dropout": 0.1}, r"attention_dropout=0\.1 is not supported: our attention has no dropout"),
    "rope_type": ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
                  r"rope_parameters\.rope_type='yarn' is not supported"),
    "rope_scaling_v4": ({"rope_scaling": {"type": "linear", "factor": 2.0}}, r"rope_scaling\.rope_type='linear' is not supported"),
    "rope_extra_key": ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "factor": 2.0}},
                       r"rope_parameters sets factor, which the default RoPE does not have"),
    "head_dim": ({"head_dim": 16}, r"head_dim=16 is not supported: transformers' OLMoE sizes q_norm by hidden_size"),
    "quantized": ({"quantization_config": {"quant_method": "bitsandbytes"}}, r"quantization_config=.* is not supported"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unrepresentable_config_is_refused_at_import(case, imported, tmp_path):
    hf, _ = imported
    change, message = REFUSED[case]
    copy = tmp_path / "hf"
    shutil.copytree(hf, copy)
    (copy / "config.json").write_text(json.dumps({**_config(hf), **change}))
    with pytest.raises(ConversionError, match=message):
        hf_to_mcore(copy, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))


def test_edited_stored_config_is_checked_at_export(imported, tmp_path):
    _, ckpt = imported
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    stored = json.loads((copy / HF_CONFIG_FILE).read_text())
    (copy / HF_CONFIG_FILE).write_text(json.dumps({**stored, "clip_qkv": 4.0}))
    with pytest.raises(ConversionError, match=r"hf_config\.json: clip_qkv=4\.0 is not supported"):
        mcore_to_hf(copy, tmp_path / "out")
    (copy / HF_CONFIG_FILE).write_text(json.dumps({**stored, "num_experts_per_tok": 1}))
    with pytest.raises(ConversionError, match=r"says top_k=2 but .* has num_experts_per_tok=1"):
        mcore_to_hf(copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_every_olmoe_config_field_is_accounted_for():
    """Each field transformers' OlmoeConfig declares has a rule (mapped, fixed or HF-only)."""
    from transformers import OlmoeConfig, PreTrainedConfig

    declared = {f.name for f in dataclasses.fields(OlmoeConfig)} - {f.name for f in dataclasses.fields(PreTrainedConfig)}
    assert declared <= set(FIELDS), sorted(declared - set(FIELDS))
