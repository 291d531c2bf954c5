"""The full-width norm split over a TP group equals the whole-width norm (for tests/model/test_norms.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def split_width_lean_norm(*, rows: int = 6, width: int = 32) -> dict:
    from olmoe_megatron.model.norms import lean_rms_norm

    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=generator).bfloat16()
    weight = (1 + 0.1 * torch.randn(width, generator=generator)).bfloat16()
    grad = torch.randn(rows, width, generator=generator).bfloat16()
    part = slice(rank * width // world, (rank + 1) * width // world)

    def run(x_, w_, g_, group):
        x_ = x_.clone().requires_grad_()
        w_ = w_.clone().requires_grad_()
        y = lean_rms_norm(x_, w_, 1e-5, group=group, width=width)
        y.backward(g_)
        return y.detach(), x_.grad, w_.grad

    whole = run(x, weight, grad, None)
    split = run(x[:, part], weight[part], grad[:, part], dist.group.WORLD)
    return {
        "y_equal": bool(torch.equal(split[0], whole[0][:, part])),
        "grad_x_max_diff": float((split[1].float() - whole[1][:, part].float()).abs().max()),
        "grad_x_max": float(whole[1].float().abs().max()),
        "grad_w_equal": bool(torch.equal(split[2], whole[2][part])),
    }
