"""Our Megatron checkpoint -> HF OlmoeForCausalLM (config.json + safetensors, per-expert keys).

Streaming: the checkpoint is read one decoder layer at a time (a dist_checkpointing load of just
that layer's ShardedTensors into fresh tensors), mapped to HF keys and written as its own
safetensors shard before the next layer is read: peak memory is about one layer plus the
embeddings. Accepts a model checkpoint, a training step directory, or a training root (`latest`),
whatever layout (TP, PP, VPP, EP, ETP) wrote it: the keys are global.

config.json: the HF config the checkpoint was imported from (kept by hf-to-mcore; for a training
checkpoint, the one its run's `checkpoint.init_from` holds), written back with only the updates
hf_config.export_config lists, so HF -> ours -> HF gives the same config.json byte for byte; a
checkpoint trained from scratch gets one built from its ModelConfig.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from olmoe_megatron.checkpoint import format as ckpt_format
from olmoe_megatron.convert import hf_config as hf_config_io
from olmoe_megatron.convert import mcore_io
from olmoe_megatron.convert.errors import ConversionError, atomic_output_dir
from olmoe_megatron.convert.safetensors_io import HFShardWriter, copy_tokenizer_files
from olmoe_megatron.model import hf_mapping
from olmoe_megatron.model.config import ModelConfig

logger = logging.getLogger(__name__)

#: ModelConfig fields whose other values HF's OlmoeForCausalLM cannot hold: RMSNorms only, QK-norms
#: always, softmax routing without an expert bias.
_HF_ONLY_VALUES = (("norm_type", "rmsnorm"), ("qk_norm", True), ("router_score_function", "softmax"),
                   ("router_expert_bias", False), ("router_type", "token_choice"))


def check_hf_representable(model: ModelConfig, *, source: str) -> None:
    """Raises ConversionError naming the first field of `model` (from `source`) HF OLMoE cannot hold."""
    if not model.is_moe:
        raise ConversionError(f"{source} holds a dense model (num_experts=0); HF OLMoE needs experts "
                              "(run `olmoe convert upcycle` first)")
    if model.num_shared_experts:
        raise ConversionError(f"{source}: num_shared_experts={model.num_shared_experts} has no HF OLMoE equivalent")
    for name, hf_value in _HF_ONLY_VALUES:
        if getattr(model, name) != hf_value:
            raise ConversionError(f"{source}: model.{name}={getattr(model, name)!r} has no HF OLMoE equivalent "
                                  f"(HF OLMoE: {hf_value!r}); keep the Megatron checkpoint for this ablation")


def mcore_to_hf(
    ckpt: str | Path,
    out: str | Path,
    *,
    model_config: str | Path | None = None,
    vocab_rows: Literal["padded", "vocab"] | None = None,
    tokenizer: str | Path | None = None,
    hf_config: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Exports a checkpoint as an HF OLMoE directory; returns the resolved checkpoint directory.

    Args:
        ckpt: a model checkpoint dir, a step_XXXXXXX dir, or a training root with `latest`.
        out: the HF directory to create (written to a temporary sibling, then renamed).
        model_config: a ModelConfig YAML when the checkpoint has neither olmoe_model.yaml nor
            olmoe_run.yaml.
        vocab_rows: 'padded' writes all padded_vocab_size rows (OLMoE's HF checkpoints have 50304);
            'vocab' drops the padding rows (vocab_size rows); None: the rows of the stored HF config
            (vocab_size, as imported), else 'padded'.
        tokenizer: a directory whose tokenizer files are copied (default: the checkpoint's hf_tokenizer/,
            or that of the checkpoint the stored HF config was found in).
        hf_config: the config.json to write back: None for the stored one (see the module
            docstring), 'model' to build it from the ModelConfig, or a config.json file (or a
            directory holding config.json) to write back after the same checks.
        overwrite: replace an existing `out`.
    """
    directory = mcore_io.resolve_checkpoint(ckpt)
    model = mcore_io.read_model_config(directory, override=model_config)
    check_hf_representable(model, source=str(directory))
    dtype = mcore_io.checkpoint_dtype(directory)
    chunk = mcore_io.build_empty_model(model, dtype=dtype)
    sharded = chunk.sharded_state_dict()
    mcore_io.check_checkpoint_shapes(directory, sharded)  # weights vs model config first, then model vs HF config
    stored = _source_config(directory, hf_config)
    if vocab_rows is None:
        vocab_rows = "vocab" if stored is not None else "padded"
    rows = model.padded_vocab_size if vocab_rows == "padded" else model.vocab_size
    checkpoint_dtype = hf_config_io.dtype_name(dtype)
    if stored is None:
        config_bytes = hf_config_io.built_config(model, checkpoint_dtype=checkpoint_dtype, rows=rows)
    else:
        path, weights_dtype = stored
        raw, config = hf_config_io.read_config_file(path)
        config_bytes = hf_config_io.export_config(raw, config, model, source=str(path), weights_dtype=weights_dtype,
                                                  checkpoint_dtype=checkpoint_dtype, rows=rows)
    outside, layers = mcore_io.group_sharded_by_layer(sharded)
    with atomic_output_dir(out, overwrite=overwrite, inputs=(ckpt, directory)) as tmp:
        writer = HFShardWriter(tmp, num_shards=model.num_layers + 1)
        for i in range(model.num_layers):
            loaded = mcore_io.load_entries(directory, layers[i], dtype=dtype)
            writer.write(hf_mapping.layer_to_hf(loaded, i, model))
            del loaded
            mcore_io.release_freed_memory()
            logger.info("mcore-to-hf: layer %d/%d", i + 1, model.num_layers)
        loaded = mcore_io.load_entries(directory, outside, dtype=dtype)
        tensors = hf_mapping.non_layer_to_hf(loaded)
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[key] = tensors[key][:rows]
        writer.write(tensors)
        writer.finish()
        (tmp / "config.json").write_bytes(config_bytes)
        copy_tokenizer_files(_tokenizer_dir(directory, tokenizer, stored), tmp)
    return directory


def _source_config(directory: Path, choice: str | Path | None) -> tuple[Path, str | None] | None:
    """(the config.json to write back, the weights' dtype when it was imported), or None to build one."""
    if choice is not None and str(choice) == "model":
        return None
    if choice is not None:
        path = Path(choice)
        if path.is_dir():
            path = next((path / name for name in ("config.json", hf_config_io.HF_CONFIG_FILE) if (path / name).is_file()),
                        path / "config.json")
        if not path.is_file():
            raise ConversionError(f"--hf-config {choice}: no such config.json; pass a config.json file, a directory "
                                  "holding one, or 'model' to build it from the model config")
        return path, None
    origin = hf_config_io.find_stored(directory)
    if origin is None:
        return None
    weights_dtype = None
    record = origin / hf_config_io.HF_IMPORT_FILE
    if record.is_file():
        _, data = hf_config_io.read_config_file(record)
        weights_dtype = data.get("weights_dtype")
    return origin / hf_config_io.HF_CONFIG_FILE, weights_dtype


def _tokenizer_dir(directory: Path, tokenizer: str | Path | None, stored: tuple[Path, str | None] | None) -> Path:
    if tokenizer is not None:
        return Path(tokenizer)
    candidates = [directory, directory.parent]
    if stored is not None and stored[0].name == hf_config_io.HF_CONFIG_FILE:
        candidates.append(stored[0].parent)
    for candidate in candidates:
        if (candidate / ckpt_format.TOKENIZER_DIR).is_dir():
            return candidate / ckpt_format.TOKENIZER_DIR
    return directory / ckpt_format.TOKENIZER_DIR
