"""Weight names and layouts between our Megatron-Core OLMoE and HF transformers' OlmoeForCausalLM.

Both directions work one layer at a time, so a converter can stream. Megatron side: the full
(unsharded, single-process) state dict of our GPTModel. HF side: the per-expert keys that
`save_pretrained` writes (transformers 5 fuses experts in memory; see `fuse_hf_experts`).

Layout facts (shared/OLMOE_FACTS.md): Megatron's linear_qkv interleaves rows per query group
([q_g; k_g; v_g] for each group); its expert linear_fc1 is cat(gate, up); QK-norm weights span
the full projection width.
"""

from __future__ import annotations

import torch

from olmoe_megatron.model.config import ModelConfig

_HF_LAYER = "model.layers.{i}."
_MC_LAYER = "decoder.layers.{i}."


def hf_config_dict(model: ModelConfig) -> dict:
    """The config.json of an HF OlmoeForCausalLM with this architecture."""
    return {
        "architectures": ["OlmoeForCausalLM"],
        "model_type": "olmoe",
        "vocab_size": model.padded_vocab_size,
        "hidden_size": model.d_model,
        "intermediate_size": model.expert_ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_heads,
        "num_key_value_heads": model.kv_heads,
        "head_dim": model.kv_channels,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_sequence_length,
        "initializer_range": model.init_std,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "clip_qkv": None,
        "num_experts_per_tok": model.top_k,
        "num_experts": model.num_experts,
        "output_router_logits": False,
        "router_aux_loss_coef": model.router_aux_loss_coeff,
        "norm_topk_prob": False,
        "tie_word_embeddings": False,
        "pad_token_id": 1,
        "eos_token_id": 50279 if model.padded_vocab_size > 50279 else None,
        "bos_token_id": None,
        "torch_dtype": "float32",
    }


def split_qkv(qkv: torch.Tensor, model: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's grouped-interleaved linear_qkv weight -> (q, k, v) in head order."""
    groups, hn = model.kv_heads, model.kv_channels
    per_group = model.num_heads // groups
    grouped = qkv.view(groups, (per_group + 2) * hn, -1)
    q, k, v = torch.split(grouped, [per_group * hn, hn, hn], dim=1)
    d_in = qkv.shape[-1]
    return q.reshape(-1, d_in), k.reshape(-1, d_in), v.reshape(-1, d_in)


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """(q, k, v) in head order -> Megatron's grouped-interleaved linear_qkv weight."""
    groups, hn = model.kv_heads, model.kv_channels
    per_group = model.num_heads // groups
    d_in = q.shape[-1]
    merged = torch.cat(
        [q.view(groups, per_group * hn, d_in), k.view(groups, hn, d_in), v.view(groups, hn, d_in)], dim=1
    )
    return merged.reshape(-1, d_in)


def layer_to_hf(mc: dict[str, torch.Tensor], i: int, model: ModelConfig) -> dict[str, torch.Tensor]:
    """One decoder layer: our keys (prefix decoder.layers.{i}.) -> HF per-expert keys."""
    src, dst = _MC_LAYER.format(i=i), _HF_LAYER.format(i=i)
    q, k, v = split_qkv(mc[src + "self_attention.linear_qkv.weight"], model)
    out = {
        dst + "input_layernorm.weight": mc[src + "input_layernorm.weight"],
        dst + "self_attn.q_proj.weight": q,
        dst + "self_attn.k_proj.weight": k,
        dst + "self_attn.v_proj.weight": v,
        dst + "self_attn.o_proj.weight": mc[src + "self_attention.linear_proj.weight"],
        dst + "post_attention_layernorm.weight": mc[src + "pre_mlp_layernorm.weight"],
    }
    if model.qk_norm:
        out[dst + "self_attn.q_norm.weight"] = mc[src + "self_attention.q_layernorm.weight"]
        out[dst + "self_attn.k_norm.weight"] = mc[src + "self_attention.k_layernorm.weight"]
    out[dst + "mlp.gate.weight"] = mc[src + "mlp.router.weight"]
    for e in range(model.num_experts):
        fc1 = mc[src + f"mlp.experts.local_experts.{e}.linear_fc1.weight"]
        gate, up = torch.chunk(fc1, 2, dim=0)
        out[dst + f"mlp.experts.{e}.gate_proj.weight"] = gate
        out[dst + f"mlp.experts.{e}.up_proj.weight"] = up
        out[dst + f"mlp.experts.{e}.down_proj.weight"] = mc[src + f"mlp.experts.local_experts.{e}.linear_fc2.weight"]
    return out


def layer_from_hf(hf: dict[str, torch.Tensor], i: int, model: ModelConfig) -> dict[str, torch.Tensor]:
    """One decoder layer: HF per-expert keys -> our keys."""
    src, dst = _HF_LAYER.format(i=i), _MC_LAYER.format(i=i)
    out = {
        dst + "input_layernorm.weight": hf[src + "input_layernorm.weight"],
        dst + "self_attention.linear_qkv.weight": merge_qkv(
            hf[src + "self_attn.q_proj.weight"], hf[src + "self_attn.k_proj.weight"],
            hf[src + "self_attn.v_proj.weight"], model,
        ),
        dst + "self_attention.linear_proj.weight": hf[src + "self_attn.o_proj.weight"],
        dst + "pre_mlp_layernorm.weight": hf[src + "post_attention_layernorm.weight"],
        dst + "mlp.router.weight": hf[src + "mlp.gate.weight"],
    }
    if model.qk_norm:
        out[dst + "self_attention.q_layernorm.weight"] = hf[src + "self_attn.q_norm.weight"]
        out[dst + "self_attention.k_layernorm.weight"] = hf[src + "self_attn.k_norm.weight"]
    for e in range(model.num_experts):
        expert = src + f"mlp.experts.{e}."
        out[dst + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = torch.cat(
            [hf[expert + "gate_proj.weight"], hf[expert + "up_proj.weight"]], dim=0
        )
        out[dst + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = hf[expert + "down_proj.weight"]
    return out


def non_layer_to_hf(mc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        "model.embed_tokens.weight": mc["embedding.word_embeddings.weight"],
        "model.norm.weight": mc["decoder.final_layernorm.weight"],
        "lm_head.weight": mc["output_layer.weight"],
    }


def non_layer_from_hf(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        "embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
        "output_layer.weight": hf["lm_head.weight"],
    }


def fuse_hf_experts(hf: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Per-expert HF keys -> transformers 5's in-memory fused experts (gate_up_proj, down_proj)."""
    out = {k: v for k, v in hf.items() if ".mlp.experts." not in k}
    for i in range(model.num_layers):
        p = _HF_LAYER.format(i=i) + "mlp.experts."
        out[p + "gate_up_proj"] = torch.stack(
            [torch.cat([hf[p + f"{e}.gate_proj.weight"], hf[p + f"{e}.up_proj.weight"]]) for e in range(model.num_experts)]
        )
        out[p + "down_proj"] = torch.stack([hf[p + f"{e}.down_proj.weight"] for e in range(model.num_experts)])
    return out


# --------------------------------------------------------------------------- config.json -> ours
#: HF OlmoeConfig fields whose value we cannot represent, with the only value we accept.
_HF_FIXED = {
    "hidden_act": "silu",
    "attention_bias": False,
    "clip_qkv": None,
    "norm_topk_prob": False,
    "tie_word_embeddings": False,
}


def model_config_from_hf(hf_config: dict, *, base: ModelConfig | None = None, source: str = "config.json") -> ModelConfig:
    """The ModelConfig of an HF OlmoeForCausalLM config.json (the inverse of `hf_config_dict`).

    Architecture fields come from `hf_config`; everything HF does not record (z-loss weight, init
    cutoff, expert implementation) from `base` (default: ModelConfig's defaults). The embedding
    rows are HF's vocab_size rounded up to a multiple of 128 (zero rows are added if HF has fewer).

    Raises:
        ConfigError: another architecture, or an OLMoE option we do not implement.
    """
    from olmoe_megatron.config import ConfigError

    archs = hf_config.get("architectures") or []
    if hf_config.get("model_type") != "olmoe" or (archs and "OlmoeForCausalLM" not in archs):
        raise ConfigError(
            f"{source}: model_type={hf_config.get('model_type')!r}, architectures={archs} is not an OLMoE "
            "checkpoint; hf-to-mcore converts model_type='olmoe' (OlmoeForCausalLM) only"
        )
    for name, wanted in _HF_FIXED.items():
        value = hf_config.get(name, wanted)
        if value != wanted:
            raise ConfigError(f"{source}: {name}={value!r} is not supported (OLMoE uses {wanted!r}); "
                              "the converted model would compute a different function")
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"{source}: rope_type={rope.get('rope_type')!r} is not supported; use 'default'")
    vocab = int(hf_config["vocab_size"])
    heads = int(hf_config["num_attention_heads"])
    d_model = int(hf_config["hidden_size"])
    head_dim = hf_config.get("head_dim")
    fields = dict(
        num_layers=int(hf_config["num_hidden_layers"]),
        d_model=d_model,
        num_heads=heads,
        num_kv_heads=None if hf_config.get("num_key_value_heads", heads) == heads else int(hf_config["num_key_value_heads"]),
        head_dim=None if head_dim in (None, d_model // heads) else int(head_dim),
        vocab_size=vocab,
        padded_vocab_size=128 * -(-vocab // 128),
        max_sequence_length=int(hf_config.get("max_position_embeddings", 4096)),
        rope_theta=float(rope.get("rope_theta", hf_config.get("rope_theta", 10_000.0))),
        norm_eps=float(hf_config.get("rms_norm_eps", 1e-5)),
        qk_norm=True,
        num_experts=int(hf_config["num_experts"]),
        top_k=int(hf_config["num_experts_per_tok"]),
        expert_ffn_hidden_size=int(hf_config["intermediate_size"]),
        num_shared_experts=0,
        router_aux_loss_coeff=float(hf_config.get("router_aux_loss_coef", 0.01)),
        init_std=float(hf_config.get("initializer_range", 0.02)),
    )
    return (base or ModelConfig()).replace(**fields)


def hf_non_layer_shapes(model: ModelConfig, *, vocab_rows: int | None = None) -> dict[str, tuple[int, ...]]:
    """Shapes of the HF keys outside the decoder layers (`vocab_rows`: default padded_vocab_size)."""
    rows = model.padded_vocab_size if vocab_rows is None else vocab_rows
    return {
        "model.embed_tokens.weight": (rows, model.d_model),
        "model.norm.weight": (model.d_model,),
        "lm_head.weight": (rows, model.d_model),
    }


def hf_layer_shapes(model: ModelConfig, i: int, *, fused_experts: bool = False) -> dict[str, tuple[int, ...]]:
    """Shapes of one decoder layer's HF keys: per-expert (as saved) or transformers 5's fused form."""
    p = _HF_LAYER.format(i=i)
    d, f, e = model.d_model, model.expert_ffn_hidden_size, model.num_experts
    q, kv = model.num_heads * model.kv_channels, model.kv_heads * model.kv_channels
    out = {
        p + "input_layernorm.weight": (d,),
        p + "self_attn.q_proj.weight": (q, d),
        p + "self_attn.k_proj.weight": (kv, d),
        p + "self_attn.v_proj.weight": (kv, d),
        p + "self_attn.o_proj.weight": (d, q),
        p + "post_attention_layernorm.weight": (d,),
        p + "mlp.gate.weight": (e, d),
    }
    if model.qk_norm:
        out[p + "self_attn.q_norm.weight"] = (q,)
        out[p + "self_attn.k_norm.weight"] = (kv,)
    if fused_experts:
        out[p + "mlp.experts.gate_up_proj"] = (e, 2 * f, d)
        out[p + "mlp.experts.down_proj"] = (e, d, f)
    else:
        for j in range(e):
            out[p + f"mlp.experts.{j}.gate_proj.weight"] = (f, d)
            out[p + f"mlp.experts.{j}.up_proj.weight"] = (f, d)
            out[p + f"mlp.experts.{j}.down_proj.weight"] = (d, f)
    return out


def unfuse_hf_layer(hf: dict[str, torch.Tensor], i: int, model: ModelConfig) -> dict[str, torch.Tensor]:
    """One layer's fused experts (gate_up_proj [E, 2F, H], down_proj [E, H, F]) -> per-expert keys."""
    p = _HF_LAYER.format(i=i) + "mlp.experts."
    out = {k: v for k, v in hf.items() if k not in (p + "gate_up_proj", p + "down_proj")}
    if p + "gate_up_proj" in hf:
        for e in range(model.num_experts):
            gate, up = torch.chunk(hf[p + "gate_up_proj"][e], 2, dim=0)
            out[p + f"{e}.gate_proj.weight"] = gate
            out[p + f"{e}.up_proj.weight"] = up
            out[p + f"{e}.down_proj.weight"] = hf[p + "down_proj"][e]
    return out
