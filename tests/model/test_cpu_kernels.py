"""The fused bf16 CPU kernels (olmoe_megatron.model.cpu_kernels): each against float64 and against
the torch code it replaces, the modules that route to them, and the build and fallback machinery."""

import os

import pytest
import torch
import torch.nn.functional as F

from olmoe_megatron.model import cpu_kernels
from olmoe_megatron.model.experts import _PaddedSwiGLU, _swiglu_probs_backward, padded_layout
from olmoe_megatron.model.norms import rms_normalize
from olmoe_megatron.testing.cpu_kernels_check import vocab_parallel_ce_check
from olmoe_megatron.testing.distributed import get_pool

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler here: the CPU kernels are not built")

BF16_STEP = 2.0**-7  # one bf16 rounding step, relative


def _torch_path(monkeypatch):
    monkeypatch.setenv("OLMOE_CPU_KERNELS", "0")
    assert not cpu_kernels.available()


def _rms_reference(x, weight, eps):
    x64 = x.double()
    return weight.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)


def _rms_run(x0, w0, grad):
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    y = rms_normalize(x, w, 1e-5)
    y.backward(grad)
    return y.detach(), x.grad, w.grad, type(y.grad_fn).__name__


@pytest.fixture(scope="module")
def rms_case():
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 3, 256, generator=generator) * 3).bfloat16()
    w = (torch.rand(256, generator=generator) + 0.5).bfloat16()
    grad = torch.randn(64, 3, 256, generator=generator).bfloat16()
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    _rms_reference(x64, w64, 1e-5).backward(grad.double())
    return x, w, grad, (_rms_reference(x, w, 1e-5), x64.grad, w64.grad)


def test_rmsnorm_kernel_matches_torch_and_float64(rms_case, monkeypatch):
    x, w, grad, ref = rms_case
    kernel = _rms_run(x, w, grad)
    assert kernel[3] == "_RMSNormBF16Backward"
    _torch_path(monkeypatch)
    torch_out = _rms_run(x, w, grad)
    assert torch_out[3] != "_RMSNormBF16Backward"
    # Forward: the same roundings as the torch code; fp32 sums in another order move a few
    # outputs by one bf16 step at most.
    diff = (kernel[0].float() - torch_out[0].float()).abs()
    assert (diff <= BF16_STEP * torch_out[0].float().abs()).all()
    assert (diff == 0).float().mean() > 0.999
    for k, t, r in zip(kernel[:3], torch_out[:3], ref):  # every output at least as close to float64
        err_kernel, err_torch = (k.double() - r).abs().max(), (t.double() - r).abs().max()
        assert err_kernel <= err_torch * 1.01 + 1e-6, (err_kernel, err_torch)


def test_rmsnorm_fp32_keeps_the_torch_code():
    x = torch.randn(8, 32)
    w = torch.rand(32)
    y = rms_normalize(x, w, 1e-5)
    assert torch.equal(y, w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)))


def test_full_width_qk_norm_uses_the_kernel():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from olmoe_megatron.model.norms import FullWidthQKNorm

    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, params_dtype=torch.bfloat16)
    norm = FullWidthQKNorm(config, 16, projection="query")
    x = torch.randn(5, 2, 4, 16).bfloat16()
    y = norm(x)
    assert type(y.grad_fn.next_functions[0][0]).__name__ == "_RMSNormBF16Backward"
    expected = rms_normalize(x.reshape(5, 2, 64), norm.weight, norm.eps).view(5, 2, 4, 16)
    assert torch.equal(y, expected)


def _ce_reference(logits, target):
    full = logits.double().requires_grad_()
    loss = torch.logsumexp(full, -1) - full.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return full, loss


def test_cross_entropy_matches_megatron_math_and_float64():
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(40, 3, 500, generator=generator) * 5).bfloat16()
    target = torch.randint(0, 500, (40, 3), generator=generator)
    grad = torch.rand(40, 3, generator=generator)
    x = logits.clone().requires_grad_()
    loss = cpu_kernels.vocab_parallel_cross_entropy_bf16(x, target)
    loss.backward(grad)
    full, ref = _ce_reference(logits, target)
    ref.backward(grad.double())
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    # Megatron's fp32 computation is exact up to fp32 rounding: the kernel must be as well.
    assert (loss.double() - ref).abs().max() < 1e-5 * ref.abs().max()
    assert ((x.grad.double() - full.grad).abs() <= BF16_STEP * full.grad.abs() + 1e-7).all()


def test_cross_entropy_keeps_nan_in_its_row():
    logits = torch.randn(6, 1, 64).bfloat16()
    logits[2, 0, 5] = float("nan")
    loss = cpu_kernels.vocab_parallel_cross_entropy_bf16(logits, torch.zeros(6, 1, dtype=torch.long))
    assert torch.isnan(loss[2, 0]) and torch.isfinite(loss[[0, 1, 3, 4, 5]]).all()


def test_cross_entropy_vocab_split_over_two_ranks():
    results = get_pool(2).run(vocab_parallel_ce_check)
    for r in results:
        assert r["grad_fn"] == "_VocabParallelCrossEntropyBF16Backward"
        assert r["max_loss_diff"] < 1e-5
        assert r["max_grad_diff"] <= BF16_STEP * r["max_grad"]


@pytest.fixture(scope="module")
def swiglu_case():
    generator = torch.Generator().manual_seed(3)
    fc1 = (torch.randn(300, 2 * 48, generator=generator) * 2).bfloat16()
    probs = torch.rand(300, generator=generator)
    grad = torch.randn(300, 48, generator=generator).bfloat16()
    return fc1, probs, grad


def test_swiglu_forward_equals_torch_bitwise(swiglu_case):
    fc1, probs, _ = swiglu_case
    act = F.silu(fc1[:, :48]) * fc1[:, 48:]
    assert torch.equal(cpu_kernels.swiglu_probs_forward(fc1, probs), (act * probs.unsqueeze(-1)).to(torch.bfloat16))


def test_swiglu_backward_at_least_as_close_to_float64(swiglu_case):
    fc1, probs, grad = swiglu_case
    act = F.silu(fc1[:, :48]) * fc1[:, 48:]
    torch_fc1, torch_probs = _swiglu_probs_backward(grad, fc1, act, probs)
    kernel_fc1, kernel_probs = cpu_kernels.swiglu_probs_backward(grad, fc1, probs)
    f64, p64 = fc1.double().requires_grad_(), probs.double().requires_grad_()
    (F.silu(f64[:, :48]) * f64[:, 48:] * p64.unsqueeze(-1)).backward(grad.double())
    for kernel, ours_torch, ref in ((kernel_fc1, torch_fc1, f64.grad), (kernel_probs, torch_probs, p64.grad)):
        err_kernel, err_torch = (kernel.double() - ref).abs().max(), (ours_torch.double() - ref).abs().max()
        assert err_kernel <= err_torch * 1.01 + 1e-6, (err_kernel, err_torch)


def test_padded_swiglu_with_and_without_kernels(monkeypatch):
    generator = torch.Generator().manual_seed(4)
    counts = [9, 0, 40, 3]
    padded, index = padded_layout(counts, 32)
    x0 = torch.randn(sum(counts), 32, generator=generator).bfloat16()
    probs0 = torch.rand(sum(counts), generator=generator)
    weights0 = [(torch.randn(48, 32, generator=generator) / 6).bfloat16() for _ in counts]
    weights0 += [(torch.randn(32, 24, generator=generator) / 5).bfloat16() for _ in counts]

    def run():
        x, probs = x0.clone().requires_grad_(), probs0.clone().requires_grad_()
        weights = [w.clone().requires_grad_() for w in weights0]
        out = _PaddedSwiGLU.apply(x, probs, padded, index, counts, *weights)
        out.float().square().sum().backward()
        return [out.detach(), x.grad, probs.grad, *[w.grad for w in weights if w.grad is not None]]

    kernel = run()
    _torch_path(monkeypatch)
    reference = run()
    assert torch.equal(kernel[0], reference[0])  # the forward rounds exactly as the torch code
    for k, r in zip(kernel[1:], reference[1:]):
        assert (k.float() - r.float()).abs().max() <= 2 * BF16_STEP * r.float().abs().max()


@pytest.mark.parametrize("s_q,s_k,causal", [(37, 37, True), (5, 12, True), (9, 20, False)])
def test_attention_softmax_matches_torch(s_q, s_k, causal):
    generator = torch.Generator().manual_seed(5)
    scores = torch.randn(6, s_q, s_k, generator=generator) * 4
    mask = torch.ones(s_q, s_k, dtype=torch.bool).triu(1 + s_k - s_q) if causal else torch.zeros(s_q, s_k, dtype=torch.bool)
    reference = torch.softmax(scores.masked_fill(mask, float("-inf")), -1)
    probs = cpu_kernels.attention_softmax_forward(scores, causal=causal)
    assert probs.dtype == torch.bfloat16 and (probs[:, mask] == 0).all()
    assert ((probs.float() - reference).abs() <= BF16_STEP * reference + 1e-7).all()

    grad_probs = torch.randn(6, s_q, s_k, generator=generator)
    row = torch.randn(6, s_q, 1, generator=generator)
    expected = (probs.float() * (grad_probs - row)).to(torch.bfloat16)
    assert torch.equal(cpu_kernels.attention_softmax_backward(grad_probs, probs, row), expected)


def test_attention_operands_from_strided_bf16():
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(11, 2, 3, 16, generator=generator).bfloat16()  # [s, b, heads, d] as projected
    q = x.permute(1, 2, 0, 3).reshape(6, 11, 16)  # the attention's non-contiguous [b * heads, s, d] view
    o = torch.randn(6, 11, 16, generator=generator).bfloat16()
    assert torch.equal(cpu_kernels.widen_bsd(q, 0.25), q.float() * 0.25)  # a power of two: exact
    row = cpu_kernels.row_dot_bsd(q, o)
    assert row.shape == (6, 11, 1)
    torch.testing.assert_close(row, (q.double() * o.double()).sum(-1, keepdim=True).float(), rtol=1e-6, atol=1e-5)
    assert cpu_kernels.widen_bsd(q.transpose(1, 2)) is None  # head dim not unit-stride: torch's path


def test_attention_softmax_keeps_nan_in_its_row():
    scores = torch.randn(1, 4, 4)
    scores[0, 2, 1] = float("nan")
    probs = cpu_kernels.attention_softmax_forward(scores, causal=True)
    assert torch.isnan(probs[0, 2, :3]).all() and torch.isfinite(probs[0, [0, 1, 3]]).all()


@pytest.mark.parametrize("shape", [(16,), (16, 24)])
def test_pad_rows_equals_scatter_and_gather(shape):
    from olmoe_megatron.model.experts import _scatter_rows

    counts = [5, 0, 37, 64, 1]
    padded, index = padded_layout(counts, 32)
    rows = torch.randn(sum(counts), *shape[1:]).bfloat16() if len(shape) > 1 else torch.rand(sum(counts))
    padded_rows = cpu_kernels.pad_rows(rows, counts, padded)
    assert torch.equal(padded_rows, _scatter_rows(rows, index, sum(padded)))  # pad rows zero
    assert torch.equal(cpu_kernels.unpad_rows(padded_rows, counts, padded), rows)


def test_topk_mask_matches_torch_topk():
    generator = torch.Generator().manual_seed(8)
    for experts, k in ((16, 4), (64, 8), (5, 5)):
        scores = torch.softmax(torch.randn(300, experts, generator=generator), -1)
        expected = torch.zeros(300, experts, dtype=torch.bool).scatter(1, torch.topk(scores, k).indices, True)
        assert torch.equal(cpu_kernels.topk_mask(scores, k), expected)
    ties = torch.tensor([[1.0, 3.0, 3.0, 0.5], [2.0, float("nan"), 1.0, 2.0]])
    assert cpu_kernels.topk_mask(ties, 2).tolist() == [[False, True, True, False], [True, True, False, False]]


def test_combine_rows_is_megatrons_unpermute():
    from megatron.core.transformer.moe.moe_utils import permute, unpermute

    generator = torch.Generator().manual_seed(10)
    tokens, experts, top_k, hidden = 50, 8, 4, 24
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool).scatter(
        1, torch.rand(tokens, experts, generator=generator).topk(top_k).indices, True)
    x = torch.randn(tokens, hidden, generator=generator).bfloat16()
    permuted, _, sorted_indices = permute(x, routing_map)
    rows = (permuted.float() * torch.rand(permuted.shape[0], 1, generator=generator)).bfloat16().requires_grad_()
    ours = cpu_kernels.combine_rows(rows, sorted_indices, tokens)
    reference = unpermute(rows.detach(), sorted_indices, restore_shape=x.shape)
    exact = torch.zeros(tokens, hidden, dtype=torch.float64).index_add_(0, sorted_indices, rows.detach().double())
    assert ((ours.double() - exact).abs() <= (reference.double() - exact).abs() + 1e-12).all()  # one rounding, not four
    grad = torch.randn(tokens, hidden, generator=generator).bfloat16()
    ours.backward(grad)
    assert torch.equal(rows.grad, grad.index_select(0, sorted_indices))


def _ddp_like(weight):
    """A parameter as Megatron DDP leaves it: an fp32 main_grad and the fusion flag."""
    param = torch.nn.Parameter(weight.clone())
    param.main_grad = torch.randn(weight.shape)
    param.grad_added_to_main_grad = False
    return param


def test_accumulate_into_main_grads_adds_exactly_and_marks():
    params = [_ddp_like(torch.randn(70, 33).bfloat16()) for _ in range(3)]
    grads = [torch.randn(70, 33).bfloat16() for _ in params]
    expected = [p.main_grad + g.float() for p, g in zip(params, grads)]
    assert cpu_kernels.accumulate_into_main_grads(params, grads)
    for p, e in zip(params, expected):
        assert torch.equal(p.main_grad, e) and p.grad_added_to_main_grad


def test_accumulate_into_main_grads_needs_every_main_grad():
    params = [_ddp_like(torch.randn(4, 4).bfloat16()), torch.nn.Parameter(torch.randn(4, 4).bfloat16())]
    before = params[0].main_grad.clone()
    assert not cpu_kernels.accumulate_into_main_grads(params, [torch.ones(4, 4).bfloat16()] * 2)
    assert torch.equal(params[0].main_grad, before) and not params[0].grad_added_to_main_grad


def test_padded_swiglu_accumulates_weight_grads_under_ddp():
    generator = torch.Generator().manual_seed(6)
    counts = [7, 0, 30]
    padded, index = padded_layout(counts, 32)
    x = torch.randn(sum(counts), 16, generator=generator).bfloat16().requires_grad_()
    probs = torch.rand(sum(counts), generator=generator).requires_grad_()
    weights = [_ddp_like((torch.randn(24, 16, generator=generator) / 4).bfloat16()) for _ in counts]
    weights += [_ddp_like((torch.randn(16, 12, generator=generator) / 4).bfloat16()) for _ in counts]
    before = [w.main_grad.clone() for w in weights]
    _PaddedSwiGLU.apply(x, probs, padded, index, counts, *weights).float().sum().backward()
    for w, b in zip(weights, before):
        assert w.grad_added_to_main_grad
        assert torch.equal(w.main_grad, b + w.grad.float())  # added once; autograd's copy is left to DDP's hook


def _rope_run(fn, t0, freqs, grad):
    t = t0.clone().requires_grad_()
    y = fn(t, freqs)
    y.backward(grad)
    return y.detach(), t.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_equals_megatron_unfused_bit_for_bit(dtype):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from olmoe_megatron.model.rope import cpu_fused_apply_rotary_pos_emb

    generator = torch.Generator().manual_seed(7)
    t0 = torch.randn(19, 2, 3, 16, generator=generator).to(dtype)
    freqs = torch.rand(19, 1, 1, 16, generator=generator) * 40
    grad = torch.randn(19, 2, 3, 16, generator=generator).to(dtype)
    ours = _rope_run(cpu_fused_apply_rotary_pos_emb, t0, freqs, grad)
    reference = _rope_run(_apply_rotary_pos_emb_bshd, t0, freqs, grad)
    assert torch.equal(ours[0], reference[0]) and torch.equal(ours[1], reference[1])
    kernel_ran = type(cpu_fused_apply_rotary_pos_emb(t0.clone().requires_grad_(), freqs).grad_fn).__name__ == "_RopeBF16Backward"
    assert kernel_ran == (dtype == torch.bfloat16)


def test_rope_hook_is_installed_for_cpu_configs():
    from megatron.core.models.common.embeddings import rope_utils

    from olmoe_megatron.model.rope import cpu_fused_apply_rotary_pos_emb, install_cpu_rope

    assert install_cpu_rope() and install_cpu_rope()  # idempotent
    assert rope_utils.fused_apply_rotary_pos_emb is cpu_fused_apply_rotary_pos_emb


# ----------------------------------------------------------------------------- build machinery
def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("OLMOE_KERNEL_CACHE", str(tmp_path))
    compiler = os.environ.get("CC") or "cc"
    first = cpu_kernels._build(compiler)
    stamp = first.stat().st_mtime_ns
    second = cpu_kernels._build(compiler)
    assert first == second and second.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left


def test_failed_build_names_the_command_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("OLMOE_KERNEL_CACHE", str(tmp_path))
    bad = tmp_path / "bad-cc"
    bad.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo bad-cc 1.0 && exit 0\necho 'no such flag' >&2\nexit 1\n")
    bad.chmod(0o755)
    with pytest.raises(RuntimeError, match="bad-cc.*failed:\n.*no such flag"):
        cpu_kernels._build(str(bad))
    assert [p.name for p in tmp_path.iterdir()] == ["bad-cc"]


def test_switched_off_by_environment(monkeypatch):
    _torch_path(monkeypatch)
    assert cpu_kernels.library() is None
    assert not cpu_kernels.applies(torch.zeros(2, dtype=torch.bfloat16))
