"""Built-model checks of the ablation axes (tests/model/test_ablation_axes.py): what each recipe's
switch changes in the model Megatron builds, its optimizer and one training step.

Each function runs on the ranks of a test pool (`olmoe_megatron.testing.distributed`) and returns
plain values. Models are the recipes' own at 2 layers (the axes act per layer).
"""

from __future__ import annotations

import tempfile

import torch

_SEQ = 32


def _build(recipe_name: str, *, dtype_name: str = "fp32", num_layers: int = 2, model_changes: dict | None = None,
           train_changes: dict | None = None, seed: int = 0):
    """(run, model config, context, TransformerConfig, DDP models, optimizer) for a shrunk recipe."""
    from olmoe_megatron.model.build import build_model_chunks, build_transformer_config
    from olmoe_megatron.model.precision import PrecisionConfig
    from olmoe_megatron.parallel.context import initialize
    from olmoe_megatron.parallel.layout import ParallelLayout
    from olmoe_megatron.recipes import get_recipe
    from olmoe_megatron.training.step import attach_training_hooks, build_optimizer, wrap_ddp

    run = get_recipe(recipe_name)
    model = run.model.replace(num_layers=num_layers, **(model_changes or {}))
    train = run.train.replace(use_distributed_optimizer=False, **(train_changes or {}))
    precision = PrecisionConfig(dtype=dtype_name, spec="local")
    context = initialize(ParallelLayout(), model, seed=seed, backend="gloo")
    torch.manual_seed(seed)
    config, _ = build_transformer_config(model, context, precision=precision)
    chunks = build_model_chunks(model, context, precision=precision, config=config)
    models = wrap_ddp(chunks, config, train=train, precision=precision)
    optimizer = build_optimizer(models, train=train, precision=precision)
    attach_training_hooks(config, models, optimizer)
    return run.replace(model=model, train=train), context, config, chunks, models, optimizer


def _batches(model, *, num_sequences: int, micro_batch_size: int, seed: int = 0) -> list[dict]:
    from olmoe_megatron.testing.equivalence import global_batch, micro_batches_for_rank

    tokens = global_batch(num_sequences=num_sequences, seq_length=_SEQ, vocab_size=model.vocab_size, seed=seed)
    return micro_batches_for_rank(tokens, dp_rank=0, dp_size=1, micro_batch_size=micro_batch_size)


def built_model_facts(recipe_name: str) -> dict:
    """What the built model and its optimizer hold: parameter count against ModelConfig.num_params,
    norm modules, init extremes of the largest matrix, optimizer groups (decay, eps) by parameter."""
    from olmoe_megatron.model.norms import FullWidthQKNorm
    from olmoe_megatron.training.step import is_norm_or_embedding

    run, _, config, chunks, models, optimizer = _build(recipe_name)
    chunk = chunks[0]
    named = dict(chunk.named_parameters())
    embedding = named["embedding.word_embeddings.weight"].detach().float()
    std = run.model.init_std
    norm_classes = sorted({type(m).__name__ for n, m in chunk.named_modules()
                           if n.endswith(("layernorm", "final_layernorm")) and hasattr(m, "weight")})
    qk_norms = [m for m in chunk.modules() if isinstance(m, FullWidthQKNorm)]
    groups = [g for sub in getattr(optimizer, "chained_optimizers", [optimizer]) for g in sub.optimizer.param_groups]
    # Parameters by identity -> name; the optimizer's groups hold the DDP-wrapped model's parameters
    # (fp32 runs: the model's own tensors).
    name_of = {id(p): n for n, p in models[0].named_parameters()}
    decay_by_name = {name_of[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    no_decay = sorted(n for n, wd in decay_by_name.items() if wd == 0.0)
    decayed = sorted(n for n, wd in decay_by_name.items() if wd != 0.0)
    expected_no_decay = sorted(n for n, p in models[0].named_parameters() if is_norm_or_embedding(p, n))
    return {
        "num_params": sum(p.numel() for p in chunk.parameters()),
        "config_num_params": run.model.num_params(),
        "normalization": config.normalization,
        "norm_classes": norm_classes,
        "qk_norm_types": sorted({m.norm_type for m in qk_norms}),
        "num_qk_norms": len(qk_norms),
        "embedding_max_abs_in_std": float(embedding.abs().max()) / std,
        "embedding_beyond_3_std": int((embedding.abs() > 3 * std).sum()),
        "embedding_std": float(embedding.std()),
        "num_embedding_values": embedding.numel(),
        "decays": sorted({g["weight_decay"] for g in groups}),
        "eps": sorted({g["eps"] for g in groups}),
        "no_decay": no_decay,
        "expected_no_decay": expected_no_decay,
        "decayed_includes_output_layer": any(n.endswith("output_layer.weight") for n in decayed),
        "num_decayed": len(decayed),
    }


def expert_bias_step() -> dict:
    """ablation_expert_bias: one training step moves the bias, the metrics give its range, and a
    checkpoint of the weights holds it (saved, zeroed, loaded back)."""
    from olmoe_megatron.checkpoint.weights import load_model, model_sharded_state_dict, save_model
    from olmoe_megatron.training.moe_metrics import ExpertLoadCounter
    from olmoe_megatron.training.step import train_step

    run, context, config, chunks, models, optimizer = _build("ablation_expert_bias")
    model = run.model
    routers = [layer.mlp.router for layer in chunks[0].decoder.layers]
    before = [r.expert_bias.detach().clone() for r in routers]
    counter = ExpertLoadCounter(model.num_layers, model.num_experts).attach(chunks)
    batches = _batches(model, num_sequences=4, micro_batch_size=4)
    result = train_step(models, optimizer, batches, context, model_config=model, seq_length=_SEQ,
                        expert_load=counter)
    after = [r.expert_bias.detach().clone() for r in routers]
    counter.detach()
    sharded_keys = [k for k in model_sharded_state_dict(chunks)["model"] if k.endswith("expert_bias")]
    with tempfile.TemporaryDirectory() as directory:
        save_model(chunks, directory)
        for r in routers:
            r.expert_bias.zero_()
        load_model(chunks, directory)
    restored = all(torch.equal(r.expert_bias, a) for r, a in zip(routers, after))
    return {
        "enable_expert_bias": config.moe_router_enable_expert_bias,
        "score_function": config.moe_router_score_function,
        "update_rate": config.moe_router_bias_update_rate,
        "before_all_zero": all(bool((b == 0).all()) for b in before),
        # sign(mean - count) * rate: every expert off the mean moves by exactly the rate.
        "moved_by": sorted({round(abs(v), 12) for a in after for v in a.tolist()}),
        "bias_dtype": str(after[0].dtype),
        "metrics_min": result.expert_load["expert_bias_min"],
        "metrics_max": result.expert_load["expert_bias_max"],
        "true_min": [float(a.min()) for a in after],
        "true_max": [float(a.max()) for a in after],
        "counts_reset": all(bool((r.local_tokens_per_expert == 0).all()) for r in routers),
        "sharded_keys": sharded_keys,
        "restored_from_checkpoint": restored,
        "lb_loss": result.lb_loss,
        "updated": result.updated,
    }


def load_balancing_losses(*, num_microbatches: int) -> dict:
    """The step's reported LB loss with micro-batch and global-batch balancing, on the same weights
    and batches (4 sequences in `num_microbatches` micro-batches)."""
    from olmoe_megatron.training.step import train_step

    losses = {}
    state = None
    for balancing in ("micro_batch", "global_batch"):
        run, context, config, chunks, models, optimizer = _build(
            "ablation_global_lb", model_changes={"router_load_balancing": balancing})
        if state is None:
            state = {k: v.clone() for k, v in chunks[0].state_dict().items() if torch.is_tensor(v)}
        else:
            chunks[0].load_state_dict(state, strict=False)  # every tensor; modules' extra state is None
        batches = _batches(run.model, num_sequences=4, micro_batch_size=4 // num_microbatches)
        result = train_step(models, optimizer, batches, context, model_config=run.model, seq_length=_SEQ)
        routers = [layer.mlp.router for layer in chunks[0].decoder.layers]
        losses[balancing] = {
            "type": config.moe_router_load_balancing_type,
            "lb_loss": result.lb_loss,
            "lm_loss": result.lm_loss,
            "global_counts_reset": all(r.global_tokens_per_expert is None or bool((r.ga_steps == 0).all())
                                       for r in routers),
        }
    return losses
