"""Scenarios for the HF interop tests: random HF OLMoE checkpoints, HF reference outputs, and our
model's logits / loss in a parallel layout (run on every rank of a DistributedPool, or in a world
of one in the test process).

Under PP the logits live on the last stage; under TP they are vocab-sharded and gathered here.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from olmoe_megatron.model.config import ModelConfig
from olmoe_megatron.model.hf_mapping import fuse_hf_experts, hf_config_dict

SEED = 1234


# ----------------------------------------------------------------------------- the HF side
def hf_config(model: ModelConfig):
    from transformers import OlmoeConfig

    fields = {k: v for k, v in hf_config_dict(model).items() if k not in ("architectures", "model_type", "torch_dtype")}
    return OlmoeConfig(**fields)


def make_hf_checkpoint(model: ModelConfig, directory: str | Path, *, seed: int = 0, fused: bool = False) -> Path:
    """A random fp32 OlmoeForCausalLM saved with save_pretrained (norm weights randomised too, so
    that a swapped norm mapping shows). `fused=True` writes transformers 5's in-memory fused form."""
    from safetensors.torch import save_file
    from transformers import OlmoeForCausalLM

    torch.manual_seed(seed)
    hf = OlmoeForCausalLM(hf_config(model)).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.5)  # distinct routing probabilities (no top-k ties)
    directory = Path(directory)
    hf.save_pretrained(directory)
    if fused:
        from olmoe_megatron.convert.safetensors_io import HFReader

        reader = HFReader(directory)
        state = fuse_hf_experts(reader.read(reader.key_file), model)
        for path in reader.files:
            path.unlink()
        (directory / "model.safetensors.index.json").unlink(missing_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def load_hf(directory: str | Path):
    """from_pretrained in fp32, eval mode. transformers 5.24 with torch 2.13 leaves the rotary
    inv_freq buffer (non-persistent) uninitialised after from_pretrained here: recompute it."""
    from transformers import OlmoeForCausalLM

    hf = OlmoeForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    rotary = hf.model.rotary_emb
    inv_freq, _ = rotary.compute_default_rope_parameters(hf.config)
    rotary.inv_freq.copy_(inv_freq)
    rotary.original_inv_freq.copy_(inv_freq)
    return hf


def hf_outputs(directory: str | Path, tokens: torch.Tensor) -> dict:
    """HF's logits, mean next-token cross-entropy, aux (load-balancing) loss and router logits."""
    hf = load_hf(directory)
    with torch.no_grad():
        out = hf(tokens[:, :-1], labels=tokens[:, :-1], output_router_logits=True)
        logits = out.logits
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
    return {"logits": logits, "ce": float(ce), "aux_loss": float(out.aux_loss),
            "router_logits": [r.detach() for r in out.router_logits]}


def random_tokens(*, num_sequences: int, seq_length: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """[num_sequences, seq_length + 1]: inputs are [:, :-1], labels [:, 1:]."""
    return torch.randint(0, vocab_size, (num_sequences, seq_length + 1), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- our side
def _build_and_load(model: ModelConfig, layout_dict: dict, checkpoint: str):
    from olmoe_megatron.checkpoint.weights import load_model
    from olmoe_megatron.model.build import build_model_chunks
    from olmoe_megatron.model.precision import PrecisionConfig
    from olmoe_megatron.parallel.context import initialize
    from olmoe_megatron.parallel.layout import ParallelLayout

    context = initialize(ParallelLayout.from_dict(layout_dict), model, seed=SEED, backend="gloo")
    chunks = build_model_chunks(model, context, precision=PrecisionConfig(dtype="fp32", spec="local"))
    load_model(chunks, checkpoint)
    return context, chunks


def _micro_batch(tokens: torch.Tensor) -> dict:
    seq = tokens.shape[1] - 1
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": torch.ones(tokens.shape[0], seq),
        "position_ids": torch.arange(seq).unsqueeze(0).expand(tokens.shape[0], seq).contiguous(),
    }


def _forward_logits(chunks, context, batch: dict) -> torch.Tensor | None:
    """Forward only through Megatron's schedule; the full-vocab logits on the last stage, else None."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        output = model(b["tokens"], b["position_ids"], None)

        def collect(logits):
            return logits.sum() * 0.0, {"logits": logits.detach()}

        return output, collect

    seq = batch["tokens"].shape[1]
    iterator = [iter([batch]) for _ in chunks] if len(chunks) > 1 else iter([batch])
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iterator,
            model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=1, seq_length=seq,
            micro_batch_size=batch["tokens"].shape[0], decoder_seq_length=seq, forward_only=True,
        )
    if not context.is_last_stage:
        return None
    local = outputs[0]["logits"]  # [b, s, V / tp]
    tp_group = context.groups.tp
    if dist.get_world_size(tp_group) > 1:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(tp_group))]
        dist.all_gather(parts, local.contiguous(), group=tp_group)
        local = torch.cat(parts, dim=-1)
    return local


def layout_outputs(model_dict: dict, layout_dict: dict, *, checkpoint: str, tokens: torch.Tensor,
                   save_to: str | None = None) -> dict:
    """On every rank: load `checkpoint` in the layout; logits (last stage, else None) and LM loss.

    `save_to`: also save the loaded weights from this layout (to export a checkpoint saved with EP > 1).
    """
    from olmoe_megatron.checkpoint.weights import save_model
    from olmoe_megatron.training.step import eval_loss

    model = ModelConfig.from_dict(model_dict)
    context, chunks = _build_and_load(model, layout_dict, checkpoint)
    for chunk in chunks:
        chunk.eval()
    batch = _micro_batch(tokens)
    logits = _forward_logits(chunks, context, batch)
    loss = eval_loss(chunks, [batch], context, seq_length=tokens.shape[1] - 1)
    if save_to is not None:
        save_model(chunks, save_to)
    return {"logits": logits, "lm_loss": loss, "rank": context.rank, "tp_rank": context.tp_rank,
            "layout": context.layout.describe(context.world_size)}


def router_losses(model_dict: dict, *, checkpoint: str, tokens: torch.Tensor) -> dict:
    """Our OLMoE-normalised load-balancing loss of one training-mode forward/backward (world of one)."""
    from olmoe_megatron.training.moe_metrics import clear_router_losses, reduce_router_losses
    from olmoe_megatron.training.step import run_forward_backward

    model = ModelConfig.from_dict(model_dict)
    context, chunks = _build_and_load(model, {}, checkpoint)
    clear_router_losses()
    losses = run_forward_backward(chunks, [_micro_batch(tokens)], context, seq_length=tokens.shape[1] - 1)
    router = reduce_router_losses(model, context, num_microbatches=1)
    return {"lb_loss": router["lb_loss"], "lm_loss": float(losses[0]["lm_loss"])}


def save_random_model(model: ModelConfig, directory: str | Path, *, seed: int = 0) -> Path:
    """A freshly initialised fp32 model of ours saved as a model checkpoint (world of one)."""
    from olmoe_megatron.checkpoint.format import write_model_config
    from olmoe_megatron.checkpoint.weights import save_model
    from olmoe_megatron.model.build import build_model_chunks
    from olmoe_megatron.model.precision import PrecisionConfig
    from olmoe_megatron.parallel.context import initialize
    from olmoe_megatron.parallel.layout import ParallelLayout

    context = initialize(ParallelLayout(), model, seed=seed, backend="gloo")
    chunks = build_model_chunks(model, context, precision=PrecisionConfig(dtype="fp32", spec="local"))
    with torch.no_grad():
        for name, param in chunks[0].named_parameters():
            if name.endswith(("norm.weight", "layer_norm_weight", "layernorm.weight")):
                param.uniform_(0.5, 1.5)
    directory = Path(directory)
    save_model(chunks, directory)
    write_model_config(directory, model)
    return directory
