"""Scenarios for the distributed equivalence tests (run on every rank of a DistributedPool).

A reference process saves its initial weights and records one training step; each layout then
loads those weights, trains one step on the same global batch split over its data-parallel ranks,
and must report the same LM loss, load-balancing loss, z-loss, gradient norm and loss after the
optimizer update, and then the same evaluation: validation loss of fixed windows and the
log-likelihood of each choice request (olmoe_megatron/evaluation).
"""

from __future__ import annotations

import numpy as np
import torch

from olmoe_megatron.checkpoint.weights import load_model, save_model
from olmoe_megatron.evaluation.sources import EvalWindows
from olmoe_megatron.model.build import build_model_chunks, build_transformer_config
from olmoe_megatron.model.config import ModelConfig
from olmoe_megatron.model.precision import PrecisionConfig
from olmoe_megatron.parallel.context import initialize
from olmoe_megatron.parallel.layout import ParallelLayout
from olmoe_megatron.training.config import TrainConfig
from olmoe_megatron.training.schedule import learning_rate
from olmoe_megatron.training.step import (
    attach_training_hooks,
    build_optimizer,
    eval_loss,
    set_learning_rate,
    train_step,
    wrap_ddp,
)

SEED = 1234


def global_batch(*, num_sequences: int, seq_length: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """[num_sequences, seq_length + 1] random tokens, identical on every rank."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_sequences, seq_length + 1), generator=generator)


def micro_batches_for_rank(tokens: torch.Tensor, *, dp_rank: int, dp_size: int, micro_batch_size: int) -> list[dict]:
    """This DP rank's contiguous slice of the global batch, as micro-batch dicts."""
    per_rank = tokens.shape[0] // dp_size
    mine = tokens[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    seq = tokens.shape[1] - 1
    out = []
    for start in range(0, per_rank, micro_batch_size):
        chunk = mine[start:start + micro_batch_size]
        out.append({
            "tokens": chunk[:, :-1].contiguous(),
            "labels": chunk[:, 1:].contiguous(),
            "loss_mask": torch.ones(chunk.shape[0], seq),
            "position_ids": torch.arange(seq).unsqueeze(0).expand(chunk.shape[0], seq).contiguous(),
        })
    return out


def eval_windows(*, num_windows: int, seq_length: int, vocab_size: int) -> EvalWindows:
    """Fixed validation windows (a count no layout's micro-batches x DP divides: padding is exercised)."""
    stream = global_batch(num_sequences=1, seq_length=num_windows * seq_length, vocab_size=vocab_size, seed=1)[0]
    windows = stream[:num_windows * seq_length + 1].numpy()
    index = np.arange(num_windows)[:, None] * seq_length + np.arange(seq_length + 1)[None, :]
    rows = windows[index]
    mask = np.ones((num_windows, seq_length), dtype=np.float32)
    mask[0, :5] = 0.0  # a partly masked window: the mean is over counted tokens only
    return EvalWindows("synthetic", rows[:, :-1].copy(), rows[:, 1:].copy(), mask, "random tokens")


def choice_requests(*, num_requests: int, max_length: int, vocab_size: int) -> list[tuple[list[int], list[int]]]:
    """Requests of varied lengths, some longer than `max_length` (truncated from the left)."""
    generator = torch.Generator().manual_seed(2)
    requests = []
    for i in range(num_requests):
        context_length = 1 + (7 * i) % (max_length + 4)
        continuation_length = 1 + (3 * i) % 6
        ids = torch.randint(0, vocab_size, (context_length + continuation_length,), generator=generator).tolist()
        requests.append((ids[:context_length], ids[context_length:]))
    return requests


def evaluate_after_step(models, context, *, seq_length: int, vocab_size: int, micro_batch_size: int) -> dict:
    """Validation loss of fixed windows and log-likelihoods of choice requests, forward only."""
    from olmoe_megatron.evaluation.evaluator import pad_multiple
    from olmoe_megatron.evaluation.forward import evaluation_mode
    from olmoe_megatron.evaluation.scoring import choice_logliks, validation_loss

    windows = eval_windows(num_windows=5, seq_length=seq_length, vocab_size=vocab_size)
    requests = choice_requests(num_requests=11, max_length=seq_length, vocab_size=vocab_size)
    with evaluation_mode(models):
        loss = validation_loss(models, windows, context, micro_batch_size=micro_batch_size)
        logliks = choice_logliks(models, requests, context, micro_batch_size=micro_batch_size + 1,
                                 max_length=seq_length, pad_multiple=pad_multiple(context))
    return {"eval_loss": loss["loss"], "eval_tokens": loss["tokens"], "choice_logliks": logliks.tolist()}


def one_step(
    model_dict: dict,
    layout_dict: dict,
    *,
    checkpoint: str,
    save: bool = False,
    train_dict: dict | None = None,
    num_sequences: int = 8,
    seq_length: int = 32,
    micro_batch_size: int = 1,
) -> dict:
    """Build (or load), train one step, evaluate; returns the reduced metrics on every rank."""
    model = ModelConfig.from_dict(model_dict)
    layout = ParallelLayout.from_dict(layout_dict)
    train = TrainConfig.from_dict({"schedule": "constant", "lr": 1e-3, "seq_length": seq_length,
                                   "global_batch_size": num_sequences, "micro_batch_size": micro_batch_size,
                                   "max_steps": 1, **(train_dict or {})})
    precision = PrecisionConfig(dtype="fp32", spec="local")
    context = initialize(layout, model, seed=SEED, backend="gloo")
    config, _ = build_transformer_config(model, context, precision=precision)
    chunks = build_model_chunks(model, context, precision=precision, config=config)
    if save:
        save_model(chunks, checkpoint)
    else:
        load_model(chunks, checkpoint)
    models = wrap_ddp(chunks, config, train=train, precision=precision)
    optimizer = build_optimizer(models, train=train, precision=precision)
    attach_training_hooks(config, models, optimizer)
    set_learning_rate(optimizer, learning_rate(train, 0))
    tokens = global_batch(num_sequences=num_sequences, seq_length=seq_length, vocab_size=model.vocab_size)
    batches = micro_batches_for_rank(tokens, dp_rank=context.dp_rank, dp_size=context.dp_size,
                                     micro_batch_size=micro_batch_size)
    result = train_step(models, optimizer, batches, context, model_config=model, seq_length=seq_length)
    loss_after = eval_loss(models, batches, context, seq_length=seq_length)
    evaluation = evaluate_after_step(models, context, seq_length=seq_length, vocab_size=model.vocab_size,
                                     micro_batch_size=micro_batch_size)
    return {
        **evaluation,
        "lm_loss": result.lm_loss,
        "lb_loss": result.lb_loss,
        "z_loss": result.z_loss,
        "grad_norm": result.grad_norm,
        "loss_after_step": loss_after,
        "layout": layout.describe(context.world_size),
    }
