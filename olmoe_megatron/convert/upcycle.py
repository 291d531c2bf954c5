"""Sparse upcycling (OLMoE paper, section 4): a dense checkpoint -> an MoE checkpoint.

Every expert of layer i starts as a copy of the dense SwiGLU MLP of layer i (expert width = the
dense FFN width); attention, norms, embeddings and head are copied unchanged; a new router is added.
Two methods:

- `olmoe` (the default) is what OLMoE ran (allenai/OLMoE scripts/sparsify_ckpt_unsharded.py): every
  expert an UNSCALED copy of the dense MLP (w1, v1 and w2 concatenated E times), the router drawn
  from a plain (untruncated) normal, `torch.nn.init.normal_(..., std=0.02)`, mean 0. The script
  sets no seed (torch's global generator, so its router is not reproducible) and leaves its
  noise-injection, shared-expert and interleave options off. Here the router comes from a
  `torch.Generator` seeded with `seed` (default DEFAULT_SEED), drawn layer by layer in order, and the
  method, std and seed are recorded in the output's UPCYCLE_FILE. Its step 0 is not the dense model:
  OLMoE does not renormalise the top-k weights, so a token's MLP output is (sum of its top-k
  probabilities) x mlp(x), about K/E x mlp(x) for a small router.
- `function_preserving` makes step 0 reproduce the dense model exactly: with a zero router every
  probability is 1/E, the chosen weights sum to K/E, and the expert down-projections (linear_fc2) are
  scaled by E/K: K * (1/E) * (E/K) * mlp(x) = mlp(x). `router_std > 0` draws the router from
  N(0, std) to break the tie between the identical experts; step 0 then deviates from the dense
  model by how far each token's top-k probability sum strays from K/E (small for small std).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import torch

from olmoe_megatron.checkpoint import format as ckpt_format
from olmoe_megatron.checkpoint.manifest import write_manifest_for
from olmoe_megatron.convert import dist_writer, mcore_io
from olmoe_megatron.convert.errors import ConversionError, atomic_output_dir
from olmoe_megatron.model.config import ModelConfig

logger = logging.getLogger(__name__)

UpcycleMethod = Literal["olmoe", "function_preserving"]
METHODS: tuple[str, ...] = ("olmoe", "function_preserving")
DEFAULT_ROUTER_STD: dict[str, float] = {"olmoe": 0.02, "function_preserving": 0.0}
"""Router init std per method: OLMoE's N(0, 0.02); the function-preserving zero router."""
DEFAULT_SEED = 0
"""Seed of the router init (OLMoE's script set none)."""
UPCYCLE_FILE = "olmoe_upcycle.json"
"""Written next to the upcycled checkpoint: source, method, router std and seed."""


def upcycled_config(dense: ModelConfig, *, num_experts: int, top_k: int) -> ModelConfig:
    """The MoE architecture: `num_experts` experts of the dense FFN width, `top_k` per token."""
    if dense.is_moe:
        raise ConversionError(f"the checkpoint is already an MoE model (num_experts={dense.num_experts}); "
                              "upcycle takes a dense model (num_experts=0)")
    return dense.replace(num_experts=num_experts, top_k=top_k,
                         expert_ffn_hidden_size=dense.dense_ffn_hidden_size, ffn_hidden_size=None)


def expert_output_scale(*, method: UpcycleMethod, num_experts: int, top_k: int) -> float:
    """The factor on the experts' linear_fc2: 1 for OLMoE's copies; E/K (cancelling a zero router's
    uniform top-k weight sum K/E) for the function-preserving method."""
    return num_experts / top_k if method == "function_preserving" else 1.0


def upcycle_layer(
    dense: dict[str, torch.Tensor], i: int, moe: ModelConfig, *, method: UpcycleMethod, router_std: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """One layer's dense weights (our keys) -> the upcycled layer's weights (our keys)."""
    prefix = f"decoder.layers.{i}.mlp."
    out = {k: v for k, v in dense.items() if not k.startswith(prefix)}
    fc1, fc2 = dense[prefix + "linear_fc1.weight"], dense[prefix + "linear_fc2.weight"]
    scale = expert_output_scale(method=method, num_experts=moe.num_experts, top_k=moe.top_k)
    expert_fc2 = fc2 if scale == 1.0 else (fc2.float() * scale).to(fc2.dtype)
    for e in range(moe.num_experts):
        out[prefix + f"experts.local_experts.{e}.linear_fc1.weight"] = fc1
        out[prefix + f"experts.local_experts.{e}.linear_fc2.weight"] = expert_fc2
    # Drawn in fp32 on the CPU generator, so the values do not depend on the checkpoint dtype's
    # kernels; OLMoE's torch.nn.init.normal_ is the same untruncated normal.
    router = torch.zeros(moe.num_experts, moe.d_model, dtype=torch.float32)
    if router_std > 0:
        router.normal_(0.0, router_std, generator=generator)
    out[prefix + "router.weight"] = router.to(fc1.dtype)
    return out


def upcycle(
    dense_ckpt: str | Path,
    out: str | Path,
    *,
    num_experts: int,
    top_k: int,
    method: UpcycleMethod = "olmoe",
    router_std: float | None = None,
    seed: int = DEFAULT_SEED,
    model_config: str | Path | None = None,
    overwrite: bool = False,
) -> ModelConfig:
    """Writes the upcycled MoE checkpoint at `out`; returns its ModelConfig.

    Args:
        dense_ckpt: Dense model checkpoint, step directory or training root (follows `latest`).
        out: Checkpoint directory to create.
        num_experts: Experts per layer, each a copy of the dense MLP.
        top_k: Experts per token.
        method: 'olmoe' (unscaled copies, router N(0, 0.02): what OLMoE ran) or 'function_preserving'
            (fc2 x E/K, zero router: step 0 equals the dense model).
        router_std: Std of the router init; None: the method's default (DEFAULT_ROUTER_STD).
        seed: Seed of the router init (recorded in UPCYCLE_FILE).
        model_config: ModelConfig YAML if the checkpoint has none.
        overwrite: Replace an existing `out`.

    Raises:
        ConversionError: an unknown method, a negative std, an MoE source, or a checkpoint that does
            not match its model config.
    """
    if method not in METHODS:
        raise ConversionError(f"--method={method!r} is not an upcycling method; use one of {', '.join(METHODS)}")
    if num_experts < 1:
        raise ConversionError(f"--num-experts={num_experts} must be at least 1 (OLMoE: 64)")
    if not 1 <= top_k <= num_experts:
        raise ConversionError(f"--top-k={top_k} must be between 1 and --num-experts={num_experts} (OLMoE: 8 of 64)")
    std = DEFAULT_ROUTER_STD[method] if router_std is None else router_std
    if std < 0:
        raise ConversionError(f"--router-std={std} must be >= 0 (OLMoE: 0.02)")
    directory = mcore_io.resolve_checkpoint(dense_ckpt)
    dense = mcore_io.read_model_config(directory, override=model_config)
    moe = upcycled_config(dense, num_experts=num_experts, top_k=top_k)
    dtype = mcore_io.checkpoint_dtype(directory)
    dense_chunk = mcore_io.build_empty_model(dense, dtype=dtype)
    sharded = dense_chunk.sharded_state_dict()
    mcore_io.check_checkpoint_shapes(directory, sharded)
    outside, layers = mcore_io.group_sharded_by_layer(sharded)
    del dense_chunk, sharded
    generator = torch.Generator().manual_seed(seed)
    scale = expert_output_scale(method=method, num_experts=num_experts, top_k=top_k)

    def produce(group: int | None) -> dict[str, torch.Tensor]:
        # Called once per group in layer order (dist_writer), so the routers are drawn layer by layer.
        if group is None:
            return mcore_io.load_entries(directory, outside, dtype=dtype)
        loaded = mcore_io.load_entries(directory, layers[group], dtype=dtype)
        return upcycle_layer(loaded, group, moe, method=method, router_std=std, generator=generator)

    moe_sharded = mcore_io.build_empty_model(moe, dtype=dtype).sharded_state_dict()  # shapes only: never filled
    with atomic_output_dir(out, overwrite=overwrite, inputs=(dense_ckpt, directory)) as tmp:
        dist_writer.write_checkpoint(tmp, moe_sharded, produce, dtype=dtype)
        ckpt_format.write_model_config(tmp, moe)
        record = {"source": str(directory.resolve()), "method": method, "num_experts": num_experts,
                  "top_k": top_k, "expert_fc2_scale": scale, "router_init": "normal", "router_std": std,
                  "seed": seed}
        (tmp / UPCYCLE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        tokenizer = directory / ckpt_format.TOKENIZER_DIR
        if tokenizer.is_dir():
            from olmoe_megatron.convert.safetensors_io import copy_tokenizer_files

            copy_tokenizer_files(tokenizer, tmp / ckpt_format.TOKENIZER_DIR)
        write_manifest_for(tmp)  # sizes and checksums for `olmoe ckpt verify` and resumes
    logger.info("upcycled %s (%s): %d experts, top-%d, fc2 x %.4g, router N(0, %g) seed %d",
                directory, method, num_experts, top_k, scale, std, seed)
    return moe
