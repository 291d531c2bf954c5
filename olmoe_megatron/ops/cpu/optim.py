"""The training-step kernels: bf16 weight gradients added into DDP's fp32 buffers, the one-pass
AdamW step (clip, update, bf16 model copy), and the gradient norm.

`l2_norm` is the one gradient-norm function of the repository: Megatron's `l2_norm_impl` slot
(parallel's CPU patches, where apex is absent) and the one-pass optimizer step both call it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from olmoe_megatron.ops.cpu._args import check_lengths, check_list, fail, int64s, pointers
from olmoe_megatron.ops.cpu.loader import enabled, require_library

_BF16, _F32 = torch.bfloat16, torch.float32


def accumulate_into_main_grads(params, grads) -> bool:
    """Adds each bf16 weight gradient into its parameter's fp32 `main_grad` (Megatron DDP's
    buffer) and marks it `grad_added_to_main_grad`, as Megatron's gradient-accumulation fusion
    does, so DDP's hook does not add it again.

    Returns:
        False (nothing done: the caller leaves the gradients to autograd and DDP's hook) unless the
        kernels are enabled, every parameter has an fp32 contiguous main_grad and every gradient
        is a contiguous bf16 CPU tensor of its parameter's shape.

    Raises:
        KernelArgumentError: params and grads of different lengths.
    """
    check_lengths("accumulate_into_main_grads", params=params, grads=grads)
    if not enabled():
        return False
    for param, grad in zip(params, grads):
        main_grad = getattr(param, "main_grad", None)
        if (main_grad is None or not hasattr(param, "grad_added_to_main_grad") or main_grad.dtype != _F32
                or not main_grad.is_contiguous() or main_grad.device.type != "cpu" or grad.dtype != _BF16
                or not grad.is_contiguous() or grad.device.type != "cpu" or main_grad.shape != grad.shape
                or getattr(param, "zero_out_wgrad", False)):
            return False
    require_library("accumulate_into_main_grads").add_bf16_to_f32(
        len(grads), pointers([p.main_grad for p in params]), pointers(grads), int64s([g.numel() for g in grads]))
    for param in params:
        param.grad_added_to_main_grad = True
    return True


def adamw_step(main_params, grads, exp_avgs, exp_avg_sqs, model_params, *, lr: float, beta1: float, beta2: float,
               eps: float, weight_decay: float, step: int, grad_scale: float) -> None:
    """torch's AdamW update of fp32 `main_params` (in place, with their moments) from `grads * grad_scale`,
    also writing each updated weight to its bf16 entry of `model_params` (None: no model copy).

    Args:
        main_params, grads, exp_avgs, exp_avg_sqs: contiguous fp32 CPU tensors, one shape per index.
        model_params: None or a contiguous bf16 CPU tensor of main_params[i]'s shape, per index.
        step: the step count after this update (bias corrections).

    Raises:
        KernelArgumentError: lists of different lengths, or a tensor of another dtype, device,
            layout or shape.
    """
    kernel = "adamw_step"
    check_lengths(kernel, main_params=main_params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                  model_params=model_params)
    check_list(kernel, "main_params", main_params, dtype=_F32)
    for name, tensors in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)):
        check_list(kernel, name, tensors, dtype=_F32, like=main_params, like_name="main_params")
    copies = [i for i, m in enumerate(model_params) if m is not None]
    if copies:
        check_list(kernel, "model_params (not None)", [model_params[i] for i in copies], dtype=_BF16,
                   like=[main_params[i] for i in copies], like_name="main_params (same entries)")
    if step < 1:
        raise fail(kernel, "step", f"is {step}", "the step count after this update, >= 1")
    require_library(kernel).adamw_bf16_step(
        len(main_params), pointers(main_params), pointers(grads), pointers(exp_avgs), pointers(exp_avg_sqs),
        pointers(model_params), int64s([t.numel() for t in main_params]),
        lr, beta1, beta2, eps, weight_decay, 1.0 - beta1**step, 1.0 - beta2**step, grad_scale,
    )


def sum_of_squares(tensors: Sequence[torch.Tensor]) -> float:
    """sum(t ** 2) over contiguous fp32 CPU tensors, accumulated in double in one C pass.

    Raises:
        KernelArgumentError: a tensor of another dtype, device or layout.
    """
    kernel = "sum_of_squares"
    check_list(kernel, "tensors", tensors, dtype=_F32)
    if not tensors:
        return 0.0
    return require_library(kernel).sum_squares_f32(len(tensors), pointers(tensors), int64s([t.numel() for t in tensors]))


def l2_norm(tensors: Sequence[torch.Tensor], *, squared: bool = False, one_pass: bool = False) -> torch.Tensor:
    """The L2 norm of `tensors` taken together (their square sum with `squared`), a float32 tensor [1].

    Two ways of computing it, which round differently; each caller keeps the one its runs were
    pinned with (fp32 golden losses and the layout equivalence suite depend on these bits):

    - default: torch's per-tensor norms, then the norm of those (`torch._foreach_norm`, on the
      tensors' device): what Megatron's `l2_norm_impl` slot computes on CPU runs, for every dtype.
    - `one_pass=True`: one C pass summing the squares in double, rounded to float32 once
      (`sum_of_squares`; the bf16 one-pass optimizer step). Where the kernels do not apply (not
      enabled, or a tensor that is not fp32 on CPU) it computes the default way instead.
      Non-contiguous tensors are copied first.

    Args:
        tensors: the gradients (any number, also none: 0).
        squared: the sum of squares instead of its square root.
        one_pass: the C pass where it applies (see above).
    """
    if one_pass and enabled() and all(t.dtype is _F32 and t.is_cpu for t in tensors):
        total = sum_of_squares([t if t.is_contiguous() else t.contiguous() for t in tensors])
        return torch.tensor([total if squared else math.sqrt(total)], dtype=_F32)
    if not tensors:
        return torch.zeros(1, dtype=_F32)
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors))).reshape(1).float()
    return norm * norm if squared else norm
