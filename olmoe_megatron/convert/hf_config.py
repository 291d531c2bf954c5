"""The HF config.json of a converted checkpoint: checked at import, kept verbatim, written back at export.

`hf-to-mcore` refuses a config.json our model cannot represent (`check_supported`: every field of
transformers' OlmoeConfig is in FIELDS with what the model does with it) and stores the file byte
for byte as HF_CONFIG_FILE beside olmoe_model.yaml, with HF_IMPORT_FILE recording the dtype of the
weights it came with. `mcore-to-hf` writes it back unchanged (`export_config`), except:

- `torch_dtype` / `dtype` when the checkpoint's weights are no longer in the imported dtype (a
  `--dtype` cast at import, or training in another precision);
- `vocab_size` when `--vocab-rows` asks for other rows than the config has;
- the training settings the model config may change: `max_position_embeddings`,
  `router_aux_loss_coef`, `initializer_range`.

Every other field the model config also records must agree with it (`ConversionError` naming the
field, both values and the fix). A checkpoint without a stored config (trained from scratch) gets
`hf_mapping.hf_config_dict(model)`. Changed files are written as transformers writes them
(sorted keys, indent 2), unchanged ones as their original bytes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from olmoe_megatron.convert.errors import ConversionError
from olmoe_megatron.model import hf_mapping
from olmoe_megatron.model.config import ModelConfig

logger = logging.getLogger(__name__)

HF_CONFIG_FILE = "hf_config.json"
"""The source config.json, byte for byte, in a checkpoint written by hf-to-mcore."""
HF_IMPORT_FILE = "hf_import.json"
"""Beside it: the source directory and the dtype of the weights it came with."""

#: What our model does with each OlmoeConfig field (transformers 5.24; 4.x names included):
#: 'model' - a ModelConfig field (checked against it at export); 'fixed' - only the value in
#: FIXED is supported (others refused at import); 'hf' - read by HF only (token ids, generation
#: and output switches, the dtype), kept verbatim, as are PreTrainedConfig's own fields (labels,
#: return_dict, ...) and any key transformers does not know.
FIELDS: dict[str, str] = {
    "vocab_size": "model", "hidden_size": "model", "intermediate_size": "model", "num_hidden_layers": "model",
    "num_attention_heads": "model", "num_key_value_heads": "model", "head_dim": "model",
    "max_position_embeddings": "model", "initializer_range": "model", "rms_norm_eps": "model",
    "rope_parameters": "model", "rope_theta": "model", "rope_scaling": "model", "num_experts_per_tok": "model",
    "num_experts": "model", "num_local_experts": "model", "router_aux_loss_coef": "model",
    "hidden_act": "fixed", "attention_bias": "fixed", "attention_dropout": "fixed", "clip_qkv": "fixed",
    "norm_topk_prob": "fixed", "tie_word_embeddings": "fixed", "quantization_config": "fixed",
    "pruned_heads": "fixed",
    "use_cache": "hf", "pad_token_id": "hf", "bos_token_id": "hf", "eos_token_id": "hf",
    "output_router_logits": "hf", "dtype": "hf", "torch_dtype": "hf", "architectures": "hf", "model_type": "hf",
    "transformers_version": "hf",
}

#: OlmoeConfig's defaults of the fields the mapping needs (a config.json may leave them out).
DEFAULTS = {"vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 2048, "num_hidden_layers": 16,
            "num_attention_heads": 16, "num_experts_per_tok": 8, "num_experts": 64}

#: field -> (the only supported value, why another value cannot be converted, what to do instead)
FIXED: dict[str, tuple[object, str, str]] = {
    "hidden_act": ("silu", "our experts are SwiGLU (silu)", "only OLMoE's silu experts convert"),
    "attention_bias": (False, "our attention projections have no biases",
                       "only bias-free attention (OLMoE's) converts"),
    "attention_dropout": (0.0, "our attention has no dropout (OLMoE trains with 0.0)",
                          "set attention_dropout to 0.0 in config.json to train without it (inference is unchanged)"),
    "clip_qkv": (None, "our attention does not clip q, k and v, so the model would compute another function",
                 "only models trained without clip_qkv convert"),
    "norm_topk_prob": (False, "our router does not renormalise the top-k probabilities (OLMoE: false), "
                              "so the model would compute another function",
                       "only models with norm_topk_prob=false convert"),
    "tie_word_embeddings": (False, "our model keeps the input embeddings and the output layer apart",
                            "untie it first: load it in transformers, set lm_head.weight to a copy of "
                            "model.embed_tokens.weight and config.tie_word_embeddings=False, save_pretrained "
                            "and convert that (the same function)"),
    "quantization_config": (None, "the weights are quantized", "convert the unquantized checkpoint"),
    "pruned_heads": ({}, "attention heads were pruned", "convert the unpruned checkpoint"),
}

_ROPE_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
_DTYPE_KEYS = ("torch_dtype", "dtype")

#: ModelConfig field -> the config.json field it is written as, for the fields export checks.
ARCHITECTURE = {
    "num_layers": "num_hidden_layers", "d_model": "hidden_size", "num_heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads", "kv_channels": "head_dim", "vocab_size": "vocab_size",
    "padded_vocab_size": "vocab_size", "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps",
    "num_experts": "num_experts", "top_k": "num_experts_per_tok", "expert_ffn_hidden_size": "intermediate_size",
}
#: Training settings the model config may change after import: written back from the model.
TRAINING = {"max_sequence_length": "max_position_embeddings", "router_aux_loss_coeff": "router_aux_loss_coef",
            "init_std": "initializer_range"}


def _rope_dicts(config: dict) -> list[tuple[str, dict]]:
    return [(name, config[name]) for name in ("rope_parameters", "rope_scaling") if isinstance(config.get(name), dict)]


def check_supported(config: dict, *, source: str) -> None:
    """Raises ConversionError naming the first field (and its value) of `config` our model cannot represent."""
    for name, (wanted, why, fix) in FIXED.items():
        value = config.get(name, wanted)
        if value != wanted and not (name == "pruned_heads" and not value):
            raise ConversionError(f"{source}: {name}={value!r} is not supported: {why}; {fix} ({name}={wanted!r})")
    for name in ("rope_parameters", "rope_scaling"):
        if config.get(name) is not None and not isinstance(config[name], dict):
            raise ConversionError(f"{source}: {name}={config[name]!r} must be an object like "
                                  "{\"rope_type\": \"default\", \"rope_theta\": 10000.0} or null")
    thetas = {}
    for name, rope in _rope_dicts(config):
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ConversionError(f"{source}: {name}.rope_type={kind!r} is not supported: our rotary embedding is "
                                  "the default RoPE (no scaling); only rope_type='default' converts")
        extra = sorted(set(rope) - _ROPE_KEYS)
        if extra:
            raise ConversionError(f"{source}: {name} sets {', '.join(extra)}, which the default RoPE does not "
                                  f"have; remove them (supported: {', '.join(sorted(_ROPE_KEYS))})")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConversionError(f"{source}: {name}.partial_rotary_factor={rope['partial_rotary_factor']!r} is not "
                                  "supported: our RoPE rotates the whole head (1.0)")
        if "rope_theta" in rope:
            thetas[f"{name}.rope_theta"] = rope["rope_theta"]
    if config.get("rope_theta") is not None:
        thetas["rope_theta"] = config["rope_theta"]
    if len({float(v) for v in thetas.values()}) > 1:
        raise ConversionError(f"{source}: the RoPE base is given twice with different values "
                              f"({', '.join(f'{k}={v!r}' for k, v in thetas.items())}); keep one")
    hidden = config.get("hidden_size", DEFAULTS["hidden_size"])
    heads = config.get("num_attention_heads", DEFAULTS["num_attention_heads"])
    if config.get("head_dim") not in (None, hidden // heads):
        raise ConversionError(
            f"{source}: head_dim={config['head_dim']!r} is not supported: transformers' OLMoE sizes q_norm by "
            f"hidden_size and k_norm by hidden_size / num_attention_heads, so only head_dim = hidden_size / "
            f"num_attention_heads = {hidden // heads} runs there (and converts)")
    if "num_local_experts" in config and config.get("num_experts", config["num_local_experts"]) != config["num_local_experts"]:
        raise ConversionError(f"{source}: num_local_experts={config['num_local_experts']!r} and "
                              f"num_experts={config['num_experts']!r} name the same count; keep one")


def model_config(config: dict, *, base: ModelConfig | None, source: str) -> ModelConfig:
    """check_supported, then the ModelConfig of `config` (OlmoeConfig's defaults for absent fields)."""
    check_supported(config, source=source)
    filled = dict(config)
    if "num_local_experts" in filled:
        filled.setdefault("num_experts", filled["num_local_experts"])
    for name, value in DEFAULTS.items():
        filled.setdefault(name, value)
    return hf_mapping.model_config_from_hf(filled, base=base, source=source)


def dtype_name(dtype) -> str:
    """torch.float32 -> 'float32' (the spelling config.json uses)."""
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- import
def store(checkpoint: Path, hf_dir: Path, *, weights_dtype: str | None) -> None:
    """Keeps the source config.json verbatim in `checkpoint`, with the weights' dtype at import."""
    (checkpoint / HF_CONFIG_FILE).write_bytes((hf_dir / "config.json").read_bytes())
    record = {"source": str(hf_dir.resolve()), "weights_dtype": weights_dtype}
    (checkpoint / HF_IMPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")


# --------------------------------------------------------------------------- export
def find_stored(checkpoint: Path) -> Path | None:
    """The directory holding the HF config `checkpoint` came from: the checkpoint itself (imported),
    its parent, or its run's `checkpoint.init_from` (a training run started from an imported one)."""
    for directory in (checkpoint, checkpoint.parent):
        if (directory / HF_CONFIG_FILE).is_file():
            return directory
    init_from = _init_from(checkpoint)
    if init_from is not None:
        from olmoe_megatron.checkpoint import format as ckpt_format

        try:
            origin = ckpt_format.follow_latest(init_from)
        except ckpt_format.CheckpointFormatError:
            return None
        if (origin / HF_CONFIG_FILE).is_file():
            return origin
        logger.warning("%s started from %s, which holds no %s: config.json is built from the model config",
                       checkpoint, init_from, HF_CONFIG_FILE)
    return None


def _init_from(checkpoint: Path) -> Path | None:
    from olmoe_megatron.checkpoint import format as ckpt_format
    from olmoe_megatron.config.base import load_yaml

    for directory in (checkpoint, checkpoint.parent):
        if (directory / ckpt_format.RUN_FILE).is_file():
            from olmoe_megatron.run_config import RunConfig

            try:
                run = load_yaml(RunConfig, directory / ckpt_format.RUN_FILE)
            except (ValueError, OSError) as exc:  # an older or foreign run file
                logger.warning("cannot read %s (%s): config.json is built from the model config",
                               directory / ckpt_format.RUN_FILE, exc)
                return None
            return Path(run.checkpoint.init_from) if run.checkpoint.init_from else None
    return None


def read_config_file(path: Path) -> tuple[bytes, dict]:
    try:
        raw = path.read_bytes()
        config = json.loads(raw)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{path} cannot be read as a config.json ({exc}); pass --hf-config model to build "
                              "one from the model config, or --hf-config PATH to a valid config.json") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path} holds {type(config).__name__}, not a config.json object")
    return raw, config


def _declared_dtype(config: dict) -> str | None:
    return next((config[k] for k in _DTYPE_KEYS if isinstance(config.get(k), str)), None)


def export_config(
    raw: bytes, config: dict, model: ModelConfig, *, source: str, weights_dtype: str | None, checkpoint_dtype: str,
    rows: int,
) -> bytes:
    """The config.json to write: `config` (read from `source`) with only the legitimate updates.

    Args:
        raw: the stored file's bytes, returned as they are when nothing changes.
        config: the parsed file.
        model: the checkpoint's ModelConfig; must agree with `config` on every architecture field.
        source: the stored file's path, for messages.
        weights_dtype: the dtype the weights had at import (None: the one `config` declares).
        checkpoint_dtype: the dtype of the weights being exported ('float32', 'bfloat16').
        rows: the embedding and output rows being exported.
    """
    expected = model_config(config, base=model, source=source)
    for field, key in ARCHITECTURE.items():
        ours, theirs = getattr(model, field), getattr(expected, field)
        if ours != theirs:
            raise ConversionError(
                f"the model config says {field}={ours!r} but the HF config it was imported from ({source}) has "
                f"{key}={theirs!r}: the export would describe another architecture than the weights'. Restore "
                f"the model config if it was edited by mistake; to export the model as it is now, pass "
                f"--hf-config model (config.json built from the model config; token ids and HF settings then "
                f"take their defaults) or --hf-config PATH to a config.json with {key}={ours!r}"
            )
    updates: dict[str, object] = {}
    for field, key in TRAINING.items():
        ours, theirs = getattr(model, field), getattr(expected, field)
        if ours != theirs:
            updates[key] = ours
    if config.get("vocab_size", DEFAULTS["vocab_size"]) != rows:
        updates["vocab_size"] = rows
    if checkpoint_dtype != (weights_dtype or _declared_dtype(config) or checkpoint_dtype):
        for key in [k for k in _DTYPE_KEYS if k in config] or list(_DTYPE_KEYS):
            updates[key] = checkpoint_dtype
    if not updates:
        return raw
    logger.info("config.json from %s, updated: %s", source, ", ".join(f"{k}={v!r}" for k, v in updates.items()))
    return (json.dumps({**config, **updates}, indent=2, sort_keys=True) + "\n").encode()


def built_config(model: ModelConfig, *, checkpoint_dtype: str, rows: int) -> bytes:
    """config.json of a checkpoint without a stored HF config (trained from scratch)."""
    config = hf_mapping.hf_config_dict(model)
    config["vocab_size"] = rows
    config["torch_dtype"] = config["dtype"] = checkpoint_dtype
    return (json.dumps(config, indent=2) + "\n").encode()
