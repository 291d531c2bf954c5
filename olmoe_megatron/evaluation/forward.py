"""Forward-only passes for evaluation: per-token losses in any layout, with training state untouched.

`evaluation_mode` wraps every evaluation: it completes an overlapped parameter all-gather (so the
weights are the optimizer's), switches the chunks to eval mode under `torch.no_grad`, and restores
the CPU, CUDA and Megatron RNG states afterwards, so a run with evaluation trains bit-identically
to one without (routers record no auxiliary losses and count no expert load outside training).
"""

from __future__ import annotations

import contextlib

import torch

from olmoe_megatron.parallel.context import ParallelContext
from olmoe_megatron.training.step import run_forward_backward


def _token_loss_step(data_iterator, model):
    """Megatron forward_step_func returning each token's LM loss (fp32, [mbs, S]) unreduced."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(per_token_loss):
        token_loss = per_token_loss.detach().float()
        return token_loss.sum(), {"token_loss": token_loss}

    return output, loss_func


def token_losses(models: list[torch.nn.Module], micro_batches: list[dict], context: ParallelContext, *,
                 seq_length: int) -> list[torch.Tensor]:
    """Each micro-batch's per-token LM loss [mbs, S] (fp32, on the host) on the last pipeline stage;
    an empty list on the other stages. Call inside `evaluation_mode`."""
    outputs = run_forward_backward(models, micro_batches, context, seq_length=seq_length, forward_only=True,
                                   forward_step_func=_token_loss_step)
    if not context.is_last_stage:
        return []
    return [d["token_loss"].cpu() for d in outputs]


def _rng_states() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    states = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(states["cpu"])
    get_cuda_rng_tracker().set_states(states["tracker"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


@contextlib.contextmanager
def evaluation_mode(models: list[torch.nn.Module]):
    """Eval mode and no_grad for the duration; RNG states and train/eval flags restored after."""
    from olmoe_megatron.training.checkpoint import finish_param_gather

    finish_param_gather(models)
    was_training = [model.training for model in models]
    states = _rng_states()
    try:
        for model in models:
            model.eval()
        with torch.no_grad():
            yield
    finally:
        for model, training in zip(models, was_training):
            model.train(training)
        _set_rng_states(states)
