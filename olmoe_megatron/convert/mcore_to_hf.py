"""Our Megatron checkpoint -> HF OlmoeForCausalLM (config.json + safetensors, per-expert keys).

Streaming: the checkpoint is read one decoder layer at a time (a dist_checkpointing load of just
that layer's ShardedTensors into fresh tensors), mapped to HF keys and written as its own
safetensors shard before the next layer is read: peak memory is about one layer plus the
embeddings. Accepts a model checkpoint, a training step directory, or a training root (`latest`),
whatever layout (TP, PP, VPP, EP, ETP) wrote it: the keys are global.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import torch

from olmoe_megatron.checkpoint import format as ckpt_format
from olmoe_megatron.convert import mcore_io
from olmoe_megatron.convert.errors import ConversionError, atomic_output_dir
from olmoe_megatron.convert.safetensors_io import HFShardWriter, copy_tokenizer_files
from olmoe_megatron.model import hf_mapping
from olmoe_megatron.model.config import ModelConfig

logger = logging.getLogger(__name__)

_HF_DTYPE = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


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
    vocab_rows: Literal["padded", "vocab"] = "padded",
    tokenizer: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Exports a checkpoint as an HF OLMoE directory; returns the resolved checkpoint directory.

    Args:
        ckpt: a model checkpoint dir, a step_XXXXXXX dir, or a training root with `latest`.
        out: the HF directory to create (written to a temporary sibling, then renamed).
        model_config: a ModelConfig YAML when the checkpoint has neither olmoe_model.yaml nor
            olmoe_run.yaml.
        vocab_rows: 'padded' writes all padded_vocab_size rows (OLMoE's HF checkpoints have 50304);
            'vocab' drops the padding rows (vocab_size rows, e.g. after importing an unpadded HF model).
        tokenizer: a directory whose tokenizer files are copied (default: the checkpoint's hf_tokenizer/).
        overwrite: replace an existing `out`.
    """
    directory = mcore_io.resolve_checkpoint(ckpt)
    model = mcore_io.read_model_config(directory, override=model_config)
    check_hf_representable(model, source=str(directory))
    dtype = mcore_io.checkpoint_dtype(directory)
    rows = model.padded_vocab_size if vocab_rows == "padded" else model.vocab_size
    chunk = mcore_io.build_empty_model(model, dtype=dtype)
    sharded = chunk.sharded_state_dict()
    mcore_io.check_checkpoint_shapes(directory, sharded)
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
        config = hf_mapping.hf_config_dict(model)
        config["vocab_size"] = rows
        config["torch_dtype"] = config["dtype"] = _HF_DTYPE[dtype]
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        source = Path(tokenizer) if tokenizer is not None else directory / ckpt_format.TOKENIZER_DIR
        if not source.is_dir() and tokenizer is None:
            source = directory.parent / ckpt_format.TOKENIZER_DIR
        copy_tokenizer_files(source, tmp)
    return directory
