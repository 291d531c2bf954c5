"""The optimizer step of bf16 CPU runs in one pass over the weights.

Megatron's `ChainedOptimizer.step` without apex or Transformer Engine makes three passes over every
parameter after the gradient norm: clipping scales every gradient, torch's fused AdamW updates the
fp32 main weights and moments, and `_copy_main_params_to_model_params` casts every main weight
into its bf16 model weight. On a CPU these passes are memory-bound and each costs about as much as
the update itself (olmoe_small: ~2.4 + 6.2 + 2.9 ms of a ~165 ms step). `optimizer_step` keeps
Megatron's gradient preparation and norm, then runs `ops.cpu.adamw_step`: clip factor, AdamW
and the bf16 copy in one pass, on the same optimizer state tensors (`step`, `exp_avg`,
`exp_avg_sq`), so checkpoints and a later Megatron step see exactly torch's state layout. The
gradient norm is Megatron's (the same gradients, the same all-reduce over each optimizer's grad-stats
group) with the sum of squares in one C pass instead of a norm per tensor (~2.8 -> ~1.3 ms):
`ops.cpu.l2_norm(..., one_pass=True)`, the function behind Megatron's own norm on CPU too.

It applies where every sub-optimizer is Megatron's `Float16OptimizerWithFloat16Params` (mixed
precision without the distributed optimizer, no loss scaler) over torch's AdamW in its default form,
all on CPU with the kernels built; otherwise (fp32 runs, the distributed optimizer, GPUs) it calls
Megatron's `step` unchanged.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.distributed as dist
from megatron.core.optimizer.optimizer import ChainedOptimizer, Float16OptimizerWithFloat16Params

from olmoe_megatron.ops.cpu import adamw_step, enabled, l2_norm


def _sub_optimizers(optimizer) -> list:
    return list(optimizer.chained_optimizers) if isinstance(optimizer, ChainedOptimizer) else [optimizer]


def _group_applies(group: dict) -> bool:
    return not (group.get("amsgrad") or group.get("maximize") or group.get("capturable") or group.get("differentiable"))


_STATIC_CHECKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _static_checks(optimizer) -> bool:
    """The parts of `fused_step_applies` that cannot change during a run (optimizer classes, options,
    parameter dtypes and devices), computed once per optimizer."""
    for sub in _sub_optimizers(optimizer):
        if not isinstance(sub, Float16OptimizerWithFloat16Params) or sub.grad_scaler is not None:
            return False
        if sub.is_stub_optimizer or sub.config.log_num_zeros_in_grad:
            return False
        inner = sub.optimizer
        if type(inner) is not torch.optim.AdamW or not all(_group_applies(g) for g in inner.param_groups):
            return False
        for model_group in sub.float16_groups:
            if any(p.dtype != torch.bfloat16 or p.device.type != "cpu" or not p.is_contiguous() for p in model_group):
                return False
        for group in inner.param_groups:
            if any(p.dtype != torch.float32 or p.device.type != "cpu" or not p.is_contiguous() for p in group["params"]):
                return False
    return True


def fused_step_applies(optimizer) -> bool:
    """Whether `optimizer_step` takes the one-pass path for this Megatron optimizer."""
    if optimizer not in _STATIC_CHECKS:
        _STATIC_CHECKS[optimizer] = _static_checks(optimizer)
    # Devices first: a GPU run never builds the CPU kernels.
    return _STATIC_CHECKS[optimizer] and enabled()


def _init_state(state: dict, param: torch.Tensor) -> None:
    """torch.optim.AdamW's lazy state, as its fused form creates it."""
    state["step"] = torch.zeros((), dtype=torch.float32)
    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def _adamw_one_pass(sub: Float16OptimizerWithFloat16Params, grad_scale: float) -> None:
    inner = sub.optimizer
    for index, group in enumerate(inner.param_groups):
        model_of = {id(main): model for model, main in zip(sub.float16_groups[index], sub.fp32_from_float16_groups[index])}
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        states = [inner.state[p] for p in params]
        for state, param in zip(states, params):
            if len(state) == 0:
                _init_state(state, param)
        steps = [state["step"] for state in states]
        torch._foreach_add_(steps, 1)
        # Every parameter's step count is the same unless states were loaded unevenly: one update then.
        step_values = torch.stack(steps).tolist()
        by_step: dict[float, list[int]] = {}
        for i, value in enumerate(step_values):
            by_step.setdefault(value, []).append(i)
        beta1, beta2 = group["betas"]
        for step, members in by_step.items():
            chosen = [params[i] for i in members]
            adamw_step(
                chosen, [p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p in chosen],
                [states[i]["exp_avg"] for i in members], [states[i]["exp_avg_sq"] for i in members],
                [model_of.get(id(p)) for p in chosen],
                lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]), step=int(step), grad_scale=grad_scale,
            )


def _norm_fp32(grads: list[torch.Tensor], group) -> float:
    """megatron.core.optimizer.clip_grads.get_grad_norm_fp32 (L2, no DTensors) with one C pass."""
    total = l2_norm(grads, squared=True, one_pass=True)
    # A CPU tensor on a CPU (gloo) group: only `optimizer_step`'s one-pass path calls this, and that
    # path requires every parameter on the CPU (`_static_checks`); GPU runs take Megatron's step.
    dist.all_reduce(total, group=group)
    return total.item() ** 0.5


def grad_norm(optimizer) -> float:
    """Megatron's ChainedOptimizer.get_grad_norm / MegatronOptimizer.get_grad_norm, same groups."""
    subs = _sub_optimizers(optimizer)
    if len(subs) == 1:
        return _norm_fp32(subs[0].get_main_grads_for_grad_norm(), subs[0].get_grad_stats_parallel_group())
    if optimizer.grads_states_parallel_group_is_shared():
        grads = [g for sub in subs for g in sub.get_main_grads_for_grad_norm()]
        return _norm_fp32(grads, optimizer.get_grad_stats_parallel_group())
    return math.sqrt(sum(_norm_fp32(s.get_main_grads_for_grad_norm(), s.get_grad_stats_parallel_group()) ** 2 for s in subs))


@torch.no_grad()
def optimizer_step(optimizer) -> tuple[bool, float | None, int | None]:
    """`optimizer.step()`'s contract: (updated, grad norm, zeros in grads)."""
    if not fused_step_applies(optimizer):
        return optimizer.step()
    if optimizer.prepare_grads():  # found inf/nan (loss-scaled runs only)
        return False, None, None
    norm = grad_norm(optimizer)
    grad_scale = 1.0
    max_norm = _sub_optimizers(optimizer)[0].config.clip_grad
    if max_norm > 0.0:
        # Megatron's clip_grad_by_total_norm_fp32: scale only when the factor is below 1.
        clip_coeff = max_norm / (norm + 1.0e-6)
        grad_scale = min(clip_coeff, 1.0)
    for sub in _sub_optimizers(optimizer):
        _adamw_one_pass(sub, grad_scale)
    return True, norm, None
