"""Sparse upcycling (OLMoE paper, section 4): a dense checkpoint -> an MoE checkpoint.

Every expert of layer i starts as a copy of the dense SwiGLU MLP of layer i (expert width = the
dense FFN width); attention, norms, embeddings and head are copied unchanged; a new router is added.

The choice that makes step 0 reproduce the dense model exactly: OLMoE does not renormalise the
top-k weights, so a token's output is sum_{e in top-k} p_e * expert_e(x). With a zero router every
p_e is 1/E, the chosen weights sum to K/E, and the expert down-projections (linear_fc2) are scaled
by E/K: K * (1/E) * (E/K) * mlp(x) = mlp(x). `noise_std > 0` draws the router from N(0, std) to break
the tie between the identical experts; the step-0 output then deviates from the dense one by how far
each token's top-k probability sum strays from K/E (small for small std).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from olmoe_megatron.checkpoint import format as ckpt_format
from olmoe_megatron.convert import mcore_io
from olmoe_megatron.convert.errors import ConversionError, atomic_output_dir, list_keys
from olmoe_megatron.model.config import ModelConfig

logger = logging.getLogger(__name__)


def upcycled_config(dense: ModelConfig, *, num_experts: int, top_k: int) -> ModelConfig:
    """The MoE architecture: `num_experts` experts of the dense FFN width, `top_k` per token."""
    if dense.is_moe:
        raise ConversionError(f"the checkpoint is already an MoE model (num_experts={dense.num_experts}); "
                              "upcycle takes a dense model (num_experts=0)")
    return dense.replace(num_experts=num_experts, top_k=top_k,
                         expert_ffn_hidden_size=dense.dense_ffn_hidden_size, ffn_hidden_size=None)


def expert_output_scale(*, num_experts: int, top_k: int) -> float:
    """The factor on linear_fc2 that cancels the uniform top-k weight sum K/E of a zero router."""
    return num_experts / top_k


def upcycle_layer(
    dense: dict[str, torch.Tensor], i: int, moe: ModelConfig, *, noise_std: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """One layer's dense weights (our keys) -> the upcycled layer's weights (our keys)."""
    prefix = f"decoder.layers.{i}.mlp."
    out = {k: v for k, v in dense.items() if not k.startswith(prefix)}
    fc1, fc2 = dense[prefix + "linear_fc1.weight"], dense[prefix + "linear_fc2.weight"]
    scale = expert_output_scale(num_experts=moe.num_experts, top_k=moe.top_k)
    fc2_scaled = (fc2.float() * scale).to(fc2.dtype)
    for e in range(moe.num_experts):
        out[prefix + f"experts.local_experts.{e}.linear_fc1.weight"] = fc1
        out[prefix + f"experts.local_experts.{e}.linear_fc2.weight"] = fc2_scaled
    router = torch.zeros(moe.num_experts, moe.d_model, dtype=torch.float32)
    if noise_std > 0:
        router.normal_(0.0, noise_std, generator=generator)
    out[prefix + "router.weight"] = router.to(fc1.dtype)
    return out


def upcycle(
    dense_ckpt: str | Path,
    out: str | Path,
    *,
    num_experts: int,
    top_k: int,
    noise_std: float = 0.0,
    seed: int = 0,
    model_config: str | Path | None = None,
    overwrite: bool = False,
) -> ModelConfig:
    """Writes the upcycled MoE checkpoint at `out`; returns its ModelConfig."""
    from olmoe_megatron.checkpoint.weights import save_model

    if noise_std < 0:
        raise ConversionError(f"--noise={noise_std} must be >= 0")
    directory = mcore_io.resolve_checkpoint(dense_ckpt)
    dense = mcore_io.read_model_config(directory, override=model_config)
    moe = upcycled_config(dense, num_experts=num_experts, top_k=top_k)
    dtype = mcore_io.checkpoint_dtype(directory)
    dense_chunk = mcore_io.build_empty_model(dense, dtype=dtype)
    sharded = dense_chunk.sharded_state_dict()
    mcore_io.check_checkpoint_shapes(directory, sharded)
    outside, layers = mcore_io.group_sharded_by_layer(sharded)
    del dense_chunk, sharded
    chunk = mcore_io.build_empty_model(moe, dtype=dtype)
    params = dict(chunk.named_parameters())
    filled: set[str] = set()
    generator = torch.Generator().manual_seed(seed)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        loaded = mcore_io.load_entries(directory, outside, dtype=dtype)
        mcore_io.fill_parameters(params, loaded, what="embeddings and head")
        filled.update(loaded)
        for i in range(dense.num_layers):
            loaded = mcore_io.load_entries(directory, layers[i], dtype=dtype)
            tensors = upcycle_layer(loaded, i, moe, noise_std=noise_std, generator=generator)
            mcore_io.fill_parameters(params, tensors, what=f"layer {i}")
            filled.update(tensors)
            del loaded, tensors
            mcore_io.release_freed_memory()
        unfilled = set(params) - filled
        if unfilled:
            raise ConversionError(f"upcycling left model parameters unset: {list_keys(unfilled)}")
        save_model([chunk], tmp)
        ckpt_format.write_model_config(tmp, moe)
        tokenizer = directory / ckpt_format.TOKENIZER_DIR
        if tokenizer.is_dir():
            from olmoe_megatron.convert.safetensors_io import copy_tokenizer_files

            copy_tokenizer_files(tokenizer, tmp / ckpt_format.TOKENIZER_DIR)
    logger.info("upcycled %s: %d experts, top-%d, fc2 x %.4g, router noise std %g",
                directory, num_experts, top_k, expert_output_scale(num_experts=num_experts, top_k=top_k), noise_std)
    return moe
