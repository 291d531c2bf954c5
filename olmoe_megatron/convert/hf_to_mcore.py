"""HF OlmoeForCausalLM (config.json + safetensors) -> our Megatron model checkpoint.

Streaming: config.json is checked first (hf_config.check_supported: an OlmoeConfig option our
model does not implement is refused, naming the field and its value), then every key's shape from
the safetensors headers (no data read). The checkpoint is then written group by group
(dist_writer): the embeddings and head, then one decoder layer at a time is read from HF, mapped
(QKV interleave, cat(gate, up)) and written before the next is read. Neither the HF model nor ours
is ever held whole: peak memory is about one layer (benchmarks/convert_memory.py).

The source config.json is kept byte for byte in the checkpoint (hf_config.HF_CONFIG_FILE), so that
mcore-to-hf writes it back; the tokenizer files and generation_config.json go to hf_tokenizer/.

Vocabulary: the embedding and output matrices get HF's rows rounded up to a multiple of 128; if HF
has fewer rows the extra rows are zeros (a logged warning says so) and `vocab_size` records HF's.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from olmoe_megatron.checkpoint import format as ckpt_format
from olmoe_megatron.checkpoint.manifest import write_manifest_for
from olmoe_megatron.config import ConfigError
from olmoe_megatron.convert import dist_writer, hf_config, mcore_io
from olmoe_megatron.convert.errors import ConversionError, atomic_output_dir, list_keys
from olmoe_megatron.convert.safetensors_io import HFReader
from olmoe_megatron.model import hf_mapping
from olmoe_megatron.model.config import ModelConfig

logger = logging.getLogger(__name__)

#: Keys some HF checkpoints carry that hold no weights of the model (recomputed buffers).
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _expected_shapes(reader: HFReader, model: ModelConfig) -> tuple[dict[str, tuple[int, ...]], list[bool]]:
    """Every key the checkpoint must hold with its shape, and per layer whether experts are fused."""
    expected = hf_mapping.hf_non_layer_shapes(model, vocab_rows=model.vocab_size)
    fused = []
    for i in range(model.num_layers):
        is_fused = f"model.layers.{i}.mlp.experts.gate_up_proj" in reader.shapes
        fused.append(is_fused)
        expected.update(hf_mapping.hf_layer_shapes(model, i, fused_experts=is_fused))
    return expected, fused


def check_keys_and_shapes(reader: HFReader, model: ModelConfig) -> list[bool]:
    """Missing, unexpected or mis-shaped keys -> one ConversionError listing them all."""
    expected, fused = _expected_shapes(reader, model)
    present = {k for k in reader.shapes if not _IGNORED.search(k)}
    missing, extra = set(expected) - present, present - set(expected)
    problems = []
    if missing:
        problems.append(f"missing keys: {list_keys(missing)}")
    if extra:
        problems.append(f"unexpected keys: {list_keys(extra)}")
    bad = [f"{k} {reader.shapes[k]} (expected {expected[k]})" for k in sorted(set(expected) & present)
           if reader.shapes[k] != expected[k]]
    if bad:
        problems.append(f"shape mismatches: {list_keys(bad)}")
    if problems:
        raise ConversionError(
            f"{reader.directory} does not match its config.json ({model.num_layers} layers, d_model "
            f"{model.d_model}, {model.num_experts} experts): " + "; ".join(problems)
        )
    return fused


def _checkpoint_dtype(reader: HFReader, dtype: str | None) -> torch.dtype:
    if dtype is not None:
        return mcore_io._DTYPES[dtype]
    found = {reader.dtypes[k] for k in reader.dtypes if not _IGNORED.search(k)}
    if len(found) != 1:
        raise ConversionError(f"{reader.directory} mixes dtypes {sorted(map(str, found))}; pass --dtype bf16 or fp32")
    (value,) = found
    mcore_io.dtype_name(value)  # raises for fp16 / fp64
    return value


def _pad_vocab(tensors: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        value = tensors[key]
        if value.shape[0] < rows:
            padded = torch.zeros(rows, value.shape[1], dtype=value.dtype)
            padded[: value.shape[0]] = value
            out[key] = padded
    return out


def hf_to_mcore(
    hf_dir: str | Path,
    out: str | Path,
    *,
    layout=None,
    dtype: str | None = None,
    base_model: ModelConfig | None = None,
    overwrite: bool = False,
) -> ModelConfig:
    """Converts an HF OLMoE checkpoint into our model checkpoint at `out`; returns its ModelConfig.

    Args:
        hf_dir: a save_pretrained directory (config.json, safetensors, optional tokenizer files).
        out: the checkpoint directory to create (written to a temporary sibling, then renamed).
        layout: a ParallelLayout the checkpoint must load into (validated up front; the checkpoint
            itself is layout-free).
        dtype: 'bf16' or 'fp32' to cast to; None keeps the safetensors dtype.
        base_model: values for ModelConfig fields HF does not record (z-loss weight, ...).
        overwrite: replace an existing `out`.
    """
    reader = HFReader(hf_dir)
    source = str(reader.directory / "config.json")
    try:
        model = hf_config.model_config(reader.config, base=base_model, source=source)
    except KeyError as exc:
        raise ConversionError(f"{source} lacks the field {exc}") from None
    if layout is not None:
        layout.validate(model, layout.smallest_world_size, backend="gloo")
    fused = check_keys_and_shapes(reader, model)
    torch_dtype = _checkpoint_dtype(reader, dtype)
    found = {reader.dtypes[k] for k in reader.dtypes if not _IGNORED.search(k)}
    weights_dtype = hf_config.dtype_name(next(iter(found))) if len(found) == 1 else None
    if model.vocab_size < model.padded_vocab_size:
        logger.warning("HF has %d vocabulary rows; padding to %d with zero rows", model.vocab_size, model.padded_vocab_size)

    def produce(group: int | None) -> dict[str, torch.Tensor]:
        if group is None:
            non_layer = reader.read(hf_mapping.hf_non_layer_shapes(model, vocab_rows=model.vocab_size))
            return _pad_vocab(hf_mapping.non_layer_from_hf(non_layer), model.padded_vocab_size)
        hf_layer = reader.read(hf_mapping.hf_layer_shapes(model, group, fused_experts=fused[group]))
        if fused[group]:
            hf_layer = hf_mapping.unfuse_hf_layer(hf_layer, group, model)
        logger.info("hf-to-mcore: layer %d/%d", group + 1, model.num_layers)
        return hf_mapping.layer_from_hf(hf_layer, group, model)

    chunk = mcore_io.build_empty_model(model, dtype=torch_dtype)  # shapes and keys only: never filled
    sharded = chunk.sharded_state_dict()
    with atomic_output_dir(out, overwrite=overwrite, inputs=(hf_dir,)) as tmp:
        dist_writer.write_checkpoint(tmp, sharded, produce, dtype=torch_dtype)
        ckpt_format.write_model_config(tmp, model)
        hf_config.store(tmp, reader.directory, weights_dtype=weights_dtype)
        copied = reader.copy_tokenizer(tmp / ckpt_format.TOKENIZER_DIR)
        if copied:
            logger.info("copied tokenizer files: %s", ", ".join(copied))
        write_manifest_for(tmp)  # sizes and checksums for `olmoe ckpt verify` and resumes
    return model


def parse_layout(text: str | None):
    """'tp=2,pp=2,ep=2,etp=1,vpp=2,sp=true' -> ParallelLayout (None for None)."""
    from olmoe_megatron.parallel.layout import ParallelLayout

    if not text:
        return None
    names = {"tp": "tensor_parallel", "pp": "pipeline_parallel", "vpp": "virtual_pipeline_parallel",
             "cp": "context_parallel", "ep": "expert_parallel", "etp": "expert_tensor_parallel",
             "sp": "sequence_parallel"}
    fields = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in names or not value:
            raise ConfigError(f"--layout {text!r}: {part!r} must be NAME=VALUE with NAME in {', '.join(names)}")
        fields[names[key]] = value.strip()
    if int(fields.get("tensor_parallel", 1)) > 1 and "sequence_parallel" not in fields:
        fields["sequence_parallel"] = "true"  # MoE with TP > 1 needs it
    return ParallelLayout.from_dict(fields)
