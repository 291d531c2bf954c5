"""One real optimizer step under Megatron's optimizer against torch's reference AdamW loop."""

from __future__ import annotations

import torch


def compare_adamw_step(dtype_name: str, *, steps: int = 2, decay_norms_and_embeddings: bool = True) -> dict:
    """Trains olmoe_tiny (shrunk) `steps` steps; before the last, snapshots the fp32 master weights,
    then replays that update with torch.optim.AdamW's for-loop implementation (OLMoE's
    hyper-parameters, each parameter group's weight decay: every parameter's unless
    `decay_norms_and_embeddings` is off) on the same clipped gradients."""
    from olmoe_megatron.model.build import build_model_chunks, build_transformer_config
    from olmoe_megatron.model.precision import PrecisionConfig
    from olmoe_megatron.parallel.context import initialize
    from olmoe_megatron.parallel.layout import ParallelLayout
    from olmoe_megatron.recipes import get_recipe
    from olmoe_megatron.testing.equivalence import global_batch, micro_batches_for_rank
    from olmoe_megatron.training.cpu_optimizer import fused_step_applies, grad_norm
    from olmoe_megatron.training.step import attach_training_hooks, build_optimizer, set_learning_rate, train_step, wrap_ddp

    run = get_recipe("olmoe_tiny")
    model = run.model.replace(vocab_size=512, padded_vocab_size=512)
    train = run.train.replace(seq_length=32, global_batch_size=4, micro_batch_size=4,
                              decay_norms_and_embeddings=decay_norms_and_embeddings)
    precision = PrecisionConfig(dtype=dtype_name, spec="local")
    context = initialize(ParallelLayout(), model, seed=0, backend="gloo")
    config, _ = build_transformer_config(model, context, precision=precision)
    chunks = build_model_chunks(model, context, precision=precision, config=config)
    models = wrap_ddp(chunks, config, train=train, precision=precision)
    optimizer = build_optimizer(models, train=train, precision=precision)
    attach_training_hooks(config, models, optimizer)
    inner = optimizer.optimizer
    lr = 3e-3
    set_learning_rate(optimizer, lr)
    tokens = global_batch(num_sequences=4, seq_length=32, vocab_size=model.vocab_size)
    batches = micro_batches_for_rank(tokens, dp_rank=0, dp_size=1, micro_batch_size=4)

    params = [p for group in inner.param_groups for p in group["params"]]
    for _ in range(steps - 1):
        train_step(models, optimizer, batches, context, model_config=model, seq_length=32)
    before = [p.detach().clone() for p in params]
    state = [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in inner.state[p].items()} for p in params]
    one_pass = fused_step_applies(optimizer)
    result = train_step(models, optimizer, batches, context, model_config=model, seq_length=32)
    megatron_norm, our_norm = optimizer.get_grad_norm(), grad_norm(optimizer)  # on the step's main grads
    # Megatron's step clips the gradients in place; the one-pass step scales them inside the update.
    clip = min(1.0, train.clip_grad / (result.grad_norm + 1.0e-6)) if one_pass else 1.0

    replay = [b.clone().requires_grad_() for b in before]
    for r, p in zip(replay, params):
        r.grad = p.grad.detach().clone() * clip
    replay_of = {id(p): r for p, r in zip(params, replay)}
    reference_groups = [{"params": [replay_of[id(p)] for p in g["params"]], "weight_decay": g["weight_decay"]}
                        for g in inner.param_groups]
    reference = torch.optim.AdamW(reference_groups, lr=lr, betas=(train.adam_beta1, train.adam_beta2),
                                  eps=train.adam_eps, weight_decay=train.weight_decay, foreach=False, fused=False)
    for r, s in zip(replay, state):
        if s:
            reference.state[r] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
    reference.step()
    diffs = [float((r.detach() - p.detach()).abs().max()) for r, p in zip(replay, params)]
    moved = [float((p.detach() - b).abs().max()) for p, b in zip(params, before)]
    sub = optimizer.chained_optimizers[0]
    pairs = zip(getattr(sub, "float16_groups", []), getattr(sub, "fp32_from_float16_groups", []))
    model_copy_exact = all(torch.equal(model_p, main_p.to(model_p.dtype))
                           for model_group, main_group in pairs for model_p, main_p in zip(model_group, main_group))
    return {
        "one_pass": one_pass,
        "norm_rel_diff": abs(megatron_norm - our_norm) / megatron_norm,
        "clipped": clip < 1.0,
        "model_copy_exact": model_copy_exact,
        "fused": sorted({bool(g.get("fused")) for g in inner.param_groups}),
        "decay": sorted({g["weight_decay"] for g in inner.param_groups}),
        "no_decay_dims": sorted({p.dim() for g in inner.param_groups if g["weight_decay"] == 0 for p in g["params"]}),
        "num_params": len(params),
        "max_diff": max(diffs),
        "min_moved": min(moved),
        "max_param": max(float(p.detach().abs().max()) for p in params),
    }
