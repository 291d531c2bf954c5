"""Runs the fused cross-entropy kernel with the vocabulary split over the ranks of a pool."""

from __future__ import annotations

import torch
import torch.distributed as dist


def vocab_parallel_ce_check(*, rows: int = 48, vocab: int = 96) -> dict:
    """Each rank holds a slice of the same bf16 logits; the loss and this rank's logit gradients
    are compared with float64 over the whole vocabulary."""
    from olmoe_megatron.ops.cpu import vocab_parallel_cross_entropy_bf16

    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(rows, 2, vocab, generator=generator) * 4).bfloat16()
    target = torch.randint(0, vocab, (rows, 2), generator=generator)
    grad_loss = torch.rand(rows, 2, generator=generator)
    shard = vocab // world
    local = logits[..., rank * shard:(rank + 1) * shard].contiguous().requires_grad_()
    loss = vocab_parallel_cross_entropy_bf16(local, target, group=dist.group.WORLD, vocab_start=rank * shard)
    loss.backward(grad_loss)

    full = logits.double().requires_grad_()
    ref = torch.logsumexp(full, -1) - full.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ref.backward(grad_loss.double())
    ref_grad = full.grad[..., rank * shard:(rank + 1) * shard]
    return {
        "grad_fn": type(loss.grad_fn).__name__,
        "max_loss_diff": float((loss.double() - ref).abs().max()),
        "max_grad_diff": float((local.grad.double() - ref_grad).abs().max()),
        "max_grad": float(ref_grad.abs().max()),
    }
