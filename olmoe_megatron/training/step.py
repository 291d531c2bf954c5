"""One optimizer step on Megatron-Core: DDP wrapping, OLMoE's AdamW, forward/backward over
micro-batches with any pipeline schedule, and the step's reduced metrics.

The trainer and the distributed equivalence tests share this code, so what the tests prove
equal to a single process is what training runs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterable

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import TransformerConfig

from olmoe_megatron.model.config import ModelConfig
from olmoe_megatron.model.precision import PrecisionConfig
from olmoe_megatron.parallel.context import ParallelContext
from olmoe_megatron.training.config import TrainConfig
from olmoe_megatron.training.cpu_optimizer import optimizer_step
from olmoe_megatron.training.moe_metrics import ExpertLoadCounter, reduce_router_losses


def wrap_ddp(
    chunks: list[torch.nn.Module], config: TransformerConfig, *, train: TrainConfig, precision: PrecisionConfig
) -> list[DistributedDataParallel]:
    """Megatron DDP around each model chunk (fp32 grad buffers, optional overlap)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=precision.grad_reduce_in_fp32,
        overlap_grad_reduce=train.overlap_grad_reduce,
        overlap_param_gather=train.overlap_param_gather,
        use_distributed_optimizer=train.use_distributed_optimizer,
        # None: Megatron's max(40M, 1M x DP) parameters with overlap on; one bucket with it off.
        bucket_size=train.ddp_bucket_size,
    )
    return [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=(i > 0))
        for i, chunk in enumerate(chunks)
    ]


def is_norm_or_embedding(param: torch.nn.Parameter, name: str) -> bool:
    """The parameters TrainConfig.decay_norms_and_embeddings=false exempts from weight decay: every
    1-D parameter (the norm weights; OLMoE has no biases) and the input embedding."""
    return param.dim() == 1 or name.endswith("word_embeddings.weight")


def weight_decay_overrides(train: TrainConfig) -> dict:
    """Megatron's `config_overrides` for TrainConfig.decay_norms_and_embeddings.

    On: an empty map (not None, which means Megatron's own "no decay on 1-D params and biases"), so
    every parameter decays, as OLMoE trained. Off: `is_norm_or_embedding` parameters get their own
    group with weight decay 0. Megatron applies a group's `wd_mult` only in its LR scheduler, which
    these runs do not use, so the group's torch option `weight_decay` is set itself; wd_mult=0 also
    keeps the group's identity (Megatron matches groups by it when loading optimizer state) apart.
    """
    if train.decay_norms_and_embeddings:
        return {}
    from megatron.core.optimizer import ParamKey, ParamWithNamePredicate

    no_decay = ParamWithNamePredicate(name="olmoe_norms_and_embeddings", fn=is_norm_or_embedding)
    return {ParamKey(with_name_predicate=no_decay): {"wd_mult": 0.0, "weight_decay": 0.0}}


def build_optimizer(models: list[DistributedDataParallel], *, train: TrainConfig, precision: PrecisionConfig):
    """OLMoE's AdamW: decay on EVERY parameter (Megatron skips biases and 1-D params by default),
    or on all but norms and the input embedding (`weight_decay_overrides`)."""
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=train.lr,
        min_lr=train.lr * train.min_lr_ratio,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_eps=train.adam_eps,
        decoupled_weight_decay=True,
        clip_grad=train.clip_grad,
        bf16=precision.dtype == "bf16",
        fp16=False,
        params_dtype=precision.torch_dtype,
        use_distributed_optimizer=train.use_distributed_optimizer,
        overlap_param_gather=train.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(opt_config, models, config_overrides=weight_decay_overrides(train))
    use_fused_adamw(optimizer)
    return optimizer


def use_fused_adamw(optimizer) -> None:
    """Switches torch's AdamW under Megatron's optimizer to its fused kernel where all state is on CPU.

    Without TE or apex, Megatron-Core steps torch.optim.AdamW in its default for-loop form: one
    kernel per operation per parameter (about 20 ms per olmoe_small step on 2 cores). The fused
    kernel is the same update in one vectorised pass (about 5 ms); on GPU, TE's or apex's fused
    Adam is used instead and nothing changes. Called after building the optimizer and after
    loading its state (which restores the saved param-group options).
    """
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if not isinstance(inner, (torch.optim.AdamW, torch.optim.Adam)):
            continue
        params = [p for group in inner.param_groups for p in group["params"]]
        if not params or any(p.device.type != "cpu" for p in params):
            continue
        inner.defaults.update(fused=True, foreach=False)
        for group in inner.param_groups:
            group.update(fused=True, foreach=False)


def attach_training_hooks(config: TransformerConfig, models: list[DistributedDataParallel], optimizer) -> None:
    """What Megatron's schedules call back into: grad finalisation, loss scaling, no_sync."""
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = [m.no_sync for m in models] if len(models) > 1 else models[0].no_sync
    if len(models) > 1:
        config.param_sync_func = [m.start_param_sync for m in models] if models[0].ddp_config.overlap_param_gather else None
    elif models[0].ddp_config.overlap_param_gather:
        config.param_sync_func = models[0].start_param_sync


def set_learning_rate(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclasses.dataclass
class StepResult:
    lm_loss: float
    lb_loss: float
    z_loss: float
    grad_norm: float
    updated: bool
    num_microbatches: int
    expert_load: dict | None = None

    @property
    def finite(self) -> bool:
        return math.isfinite(self.lm_loss) and math.isfinite(self.grad_norm)


def micro_batch_lm_loss(per_token_loss: torch.Tensor, loss_mask: torch.Tensor, *, normalization: str) -> torch.Tensor:
    """The micro-batch's summed masked cross-entropy over its tokens ('all_tokens', OLMo's) or over
    its unmasked tokens ('unmasked_tokens'): TrainConfig.loss_normalization."""
    mask = loss_mask.reshape(-1).float()
    total = torch.sum(per_token_loss.reshape(-1).float() * mask)
    if normalization == "all_tokens":
        return total / mask.numel()
    if normalization == "unmasked_tokens":
        return total / mask.sum().clamp_min(1.0)
    raise ValueError(f"train.loss_normalization={normalization!r}: use 'all_tokens' or 'unmasked_tokens'")


def _forward_step(data_iterator, model, *, normalization: str = "all_tokens"):
    """Megatron's forward_step_func: the micro-batch's cross-entropy (`micro_batch_lm_loss`)."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    loss_mask = batch["loss_mask"]

    def loss_func(per_token_loss):
        loss = micro_batch_lm_loss(per_token_loss, loss_mask, normalization=normalization)
        return loss, {"lm_loss": loss.detach().clone()}

    return output, loss_func


def _mean_lm_loss(losses: list[dict], context: ParallelContext) -> float:
    """Mean over micro-batches on the last stage, then over DP; the same value on every rank."""
    if context.is_last_stage and losses:
        value = torch.stack([d["lm_loss"].double() for d in losses]).mean()
    else:
        value = torch.zeros((), dtype=torch.float64)
    value = value.reshape(1).to(context.device)
    dist.all_reduce(value, group=context.groups.pp)
    dist.all_reduce(value, group=context.groups.dp_cp)
    return float(value / dist.get_world_size(context.groups.dp_cp))


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def run_forward_backward(
    models: list[torch.nn.Module],
    micro_batches: list[dict],
    context: ParallelContext,
    *,
    seq_length: int,
    forward_only: bool = False,
    forward_step_func=_forward_step,
) -> list[dict]:
    """Megatron's schedule (no pipeline, 1F1B or interleaved) over this rank's micro-batches.

    Returns the loss dicts of `forward_step_func`'s loss function, one per micro-batch, on the last
    pipeline stage (empty elsewhere).
    """
    forward_backward = get_forward_backward_func()
    batches = [_to_device(b, context.device) for b in micro_batches]
    micro_batch_size = batches[0]["tokens"].shape[0]
    iterator: Iterable = [iter(batches) for _ in models] if len(models) > 1 else iter(batches)
    return forward_backward(
        forward_step_func=forward_step_func,
        data_iterator=iterator,
        model=models if len(models) > 1 else models[0],
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        decoder_seq_length=seq_length,
        forward_only=forward_only,
    )


def train_step(
    models: list[DistributedDataParallel],
    optimizer,
    micro_batches: list[dict],
    context: ParallelContext,
    *,
    model_config: ModelConfig,
    seq_length: int,
    expert_load: ExpertLoadCounter | None = None,
    loss_normalization: str = "all_tokens",
) -> StepResult:
    """Forward/backward over `micro_batches`, gradient reduction, one optimizer update.

    A non-finite LM loss (the same value on every rank) skips the update: the optimizer is not
    stepped and the gradients are dropped, so one bad batch cannot poison the weights.
    """
    for model in models:
        model.zero_grad_buffer()
    optimizer.zero_grad()
    step_func = functools.partial(_forward_step, normalization=loss_normalization)
    losses = run_forward_backward(models, micro_batches, context, seq_length=seq_length, forward_step_func=step_func)
    lm_loss = _mean_lm_loss(losses, context)
    router = reduce_router_losses(model_config, context, num_microbatches=len(micro_batches))
    load = expert_load.reduce_and_reset(context) if expert_load is not None else None
    if not math.isfinite(lm_loss):
        for model in models:
            model.zero_grad_buffer()
        optimizer.zero_grad()
        return StepResult(lm_loss=lm_loss, lb_loss=router["lb_loss"], z_loss=router["z_loss"],
                          grad_norm=float("nan"), updated=False, num_microbatches=len(micro_batches),
                          expert_load=load)
    updated, grad_norm, _ = optimizer_step(optimizer)
    return StepResult(
        lm_loss=lm_loss,
        lb_loss=router["lb_loss"],
        z_loss=router["z_loss"],
        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        updated=bool(updated),
        num_microbatches=len(micro_batches),
        expert_load=load,
    )


def eval_loss(models: list[torch.nn.Module], micro_batches: list[dict], context: ParallelContext, *, seq_length: int) -> float:
    """Mean LM loss of the micro-batches, forward only (same value on every rank)."""
    for model in models:
        model.eval()
    with torch.no_grad():
        losses = run_forward_backward(models, micro_batches, context, seq_length=seq_length, forward_only=True)
    for model in models:
        model.train()
    return _mean_lm_loss(losses, context)
