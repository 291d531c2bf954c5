"""The full-width norms split over a TP group equal the whole-width norms (for tests/model/test_norms.py)."""

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


def split_width_layer_norm(*, rows: int = 6, width: int = 32) -> dict:
    """`layer_normalize` over a width split across the ranks (full-width QK LayerNorm under TP)
    against the whole width on every rank: outputs and gradients."""
    from olmoe_megatron.model.norms import layer_normalize

    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(0)
    x = 3 + torch.randn(rows, width, generator=generator, dtype=torch.float64).float()
    weight = 1 + 0.1 * torch.randn(width, generator=generator)
    grad = torch.randn(rows, width, generator=generator)
    part = width // world
    cols = slice(rank * part, (rank + 1) * part)

    def run(x_, w_, g_, group):
        x_ = x_.clone().requires_grad_()
        w_ = w_.clone().requires_grad_()
        y = layer_normalize(x_, w_, 1e-5, group=group, width=width)
        y.backward(g_)
        return y.detach(), x_.grad, w_.grad

    y_full, gx_full, gw_full = run(x, weight, grad, None)
    y_split, gx_split, gw_split = run(x[:, cols], weight[cols], grad[:, cols], dist.group.WORLD)
    reference = torch.nn.functional.layer_norm(x, (width,), weight, None, 1e-5)
    return {
        "y_max_diff": float((y_split - y_full[:, cols]).abs().max()),
        "reference_max_diff": float((y_full - reference).abs().max()),
        "grad_x_max_diff": float((gx_split - gx_full[:, cols]).abs().max()),
        "grad_w_max_diff": float((gw_split - gw_full[cols]).abs().max()),
        "grad_x_max": float(gx_full.abs().max()),
    }
