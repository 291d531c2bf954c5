"""The LM loss's normalisation on a batch with a masked instance (tests/training/test_loss_normalization.py)."""

from __future__ import annotations


def masked_instance_losses() -> dict:
    """olmoe_tiny (router losses off, lr 0) on one micro-batch of 4 sequences whose second instance
    is masked, as the repetition filter masks it: the step's LM loss and gradient norm under each
    train.loss_normalization, and the same without the masked instance."""
    from olmoe_megatron.model.build import build_model_chunks, build_transformer_config
    from olmoe_megatron.parallel.context import initialize
    from olmoe_megatron.parallel.layout import ParallelLayout
    from olmoe_megatron.recipes import get_recipe
    from olmoe_megatron.testing.equivalence import global_batch, micro_batches_for_rank
    from olmoe_megatron.training.step import attach_training_hooks, build_optimizer, set_learning_rate, train_step, wrap_ddp

    run = get_recipe("olmoe_tiny")
    model = run.model.replace(vocab_size=512, padded_vocab_size=512, router_aux_loss_coeff=0.0,
                              router_z_loss_coeff=0.0)
    train = run.train.replace(seq_length=32, global_batch_size=4, micro_batch_size=4)
    context = initialize(ParallelLayout(), model, seed=0, backend="gloo")
    config, _ = build_transformer_config(model, context, precision=run.precision)
    chunks = build_model_chunks(model, context, precision=run.precision, config=config)
    models = wrap_ddp(chunks, config, train=train, precision=run.precision)
    optimizer = build_optimizer(models, train=train, precision=run.precision)
    attach_training_hooks(config, models, optimizer)
    set_learning_rate(optimizer, 0.0)  # the weights stay put: every step sees the same model
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0
    tokens = global_batch(num_sequences=4, seq_length=32, vocab_size=model.vocab_size)
    unmasked = micro_batches_for_rank(tokens, dp_rank=0, dp_size=1, micro_batch_size=4)
    masked = [dict(batch, loss_mask=batch["loss_mask"].clone()) for batch in unmasked]
    masked[0]["loss_mask"][1] = 0.0
    out: dict = {}
    for name, batches in (("masked", masked), ("unmasked", unmasked)):
        for normalization in ("all_tokens", "unmasked_tokens"):
            result = train_step(models, optimizer, batches, context, model_config=model, seq_length=32,
                                loss_normalization=normalization)
            out[f"{name}/{normalization}"] = {"lm_loss": result.lm_loss, "grad_norm": result.grad_norm}
    return out
