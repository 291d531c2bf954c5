"""The fused bf16 CPU kernels (olmoe_megatron.ops.cpu): each against float64 and against
the torch code it replaces, the modules that route to them, and the build and fallback machinery."""

import os

import pytest
import torch
import torch.nn.functional as F

from olmoe_megatron.ops import cpu as ops
from olmoe_megatron.ops.cpu import loader
from olmoe_megatron.model.experts import _PaddedSwiGLU, _swiglu_probs_backward, padded_layout
from olmoe_megatron.model.norms import rms_normalize
from olmoe_megatron.testing.cpu_kernels_check import vocab_parallel_ce_check
from olmoe_megatron.testing.distributed import get_pool

pytestmark = pytest.mark.skipif(not ops.enabled(), reason="no C compiler here: the CPU kernels are not built")

BF16_STEP = 2.0**-7  # one bf16 rounding step, relative


def _torch_path(monkeypatch):
    monkeypatch.setenv("OLMOE_CPU_KERNELS", "0")
    assert not ops.enabled()


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

    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, params_dtype=torch.bfloat16,
                               cuda_graph_scope=[])
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
    loss = ops.vocab_parallel_cross_entropy_bf16(x, target)
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
    loss = ops.vocab_parallel_cross_entropy_bf16(logits, torch.zeros(6, 1, dtype=torch.long))
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
    assert torch.equal(ops.swiglu_probs_forward(fc1, probs), (act * probs.unsqueeze(-1)).to(torch.bfloat16))


def test_swiglu_backward_at_least_as_close_to_float64(swiglu_case):
    fc1, probs, grad = swiglu_case
    act = F.silu(fc1[:, :48]) * fc1[:, 48:]
    torch_fc1, torch_probs = _swiglu_probs_backward(grad, fc1, act, probs)
    kernel_fc1, kernel_probs = ops.swiglu_probs_backward(grad, fc1, probs)
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
    probs = ops.attention_softmax_forward(scores, causal=causal)
    assert probs.dtype == torch.bfloat16 and (probs[:, mask] == 0).all()
    assert ((probs.float() - reference).abs() <= BF16_STEP * reference + 1e-7).all()

    grad_probs = torch.randn(6, s_q, s_k, generator=generator)
    row = torch.randn(6, s_q, 1, generator=generator)
    expected = (probs.float() * (grad_probs - row)).to(torch.bfloat16)
    assert torch.equal(ops.attention_softmax_backward(grad_probs, probs, row), expected)


def test_attention_operands_from_strided_bf16():
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(11, 2, 3, 16, generator=generator).bfloat16()  # [s, b, heads, d] as projected
    q = x.permute(1, 2, 0, 3).reshape(6, 11, 16)  # the attention's non-contiguous [b * heads, s, d] view
    o = torch.randn(6, 11, 16, generator=generator).bfloat16()
    assert torch.equal(ops.widen_bsd(q, 0.25), q.float() * 0.25)  # a power of two: exact
    row = ops.row_dot_bsd(q, o)
    assert row.shape == (6, 11, 1)
    torch.testing.assert_close(row, (q.double() * o.double()).sum(-1, keepdim=True).float(), rtol=1e-6, atol=1e-5)
    assert ops.widen_bsd(q.transpose(1, 2)) is None  # head dim not unit-stride: torch's path


def test_attention_softmax_keeps_nan_in_its_row():
    scores = torch.randn(1, 4, 4)
    scores[0, 2, 1] = float("nan")
    probs = ops.attention_softmax_forward(scores, causal=True)
    assert torch.isnan(probs[0, 2, :3]).all() and torch.isfinite(probs[0, [0, 1, 3]]).all()


@pytest.mark.parametrize("shape", [(16,), (16, 24)])
def test_pad_rows_equals_scatter_and_gather(shape):
    from olmoe_megatron.model.experts import _scatter_rows

    counts = [5, 0, 37, 64, 1]
    padded, index = padded_layout(counts, 32)
    rows = torch.randn(sum(counts), *shape[1:]).bfloat16() if len(shape) > 1 else torch.rand(sum(counts))
    padded_rows = ops.pad_rows(rows, counts, padded)
    assert torch.equal(padded_rows, _scatter_rows(rows, index, sum(padded)))  # pad rows zero
    assert torch.equal(ops.unpad_rows(padded_rows, counts, padded), rows)


def test_topk_mask_matches_torch_topk():
    generator = torch.Generator().manual_seed(8)
    for experts, k in ((16, 4), (64, 8), (5, 5)):
        scores = torch.softmax(torch.randn(300, experts, generator=generator), -1)
        expected = torch.zeros(300, experts, dtype=torch.bool).scatter(1, torch.topk(scores, k).indices, True)
        assert torch.equal(ops.topk_mask(scores, k), expected)
    ties = torch.tensor([[1.0, 3.0, 3.0, 0.5], [2.0, float("nan"), 1.0, 2.0]])
    assert ops.topk_mask(ties, 2).tolist() == [[False, True, True, False], [True, True, False, False]]


def test_combine_rows_is_megatrons_unpermute():
    from megatron.core.transformer.moe.moe_utils import permute, unpermute

    generator = torch.Generator().manual_seed(10)
    tokens, experts, top_k, hidden = 50, 8, 4, 24
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool).scatter(
        1, torch.rand(tokens, experts, generator=generator).topk(top_k).indices, True)
    x = torch.randn(tokens, hidden, generator=generator).bfloat16()
    permuted, _, sorted_indices = permute(x, routing_map)
    rows = (permuted.float() * torch.rand(permuted.shape[0], 1, generator=generator)).bfloat16().requires_grad_()
    ours = ops.combine_rows(rows, sorted_indices, tokens)
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
    assert ops.accumulate_into_main_grads(params, grads)
    for p, e in zip(params, expected):
        assert torch.equal(p.main_grad, e) and p.grad_added_to_main_grad


def test_accumulate_into_main_grads_needs_every_main_grad():
    params = [_ddp_like(torch.randn(4, 4).bfloat16()), torch.nn.Parameter(torch.randn(4, 4).bfloat16())]
    before = params[0].main_grad.clone()
    assert not ops.accumulate_into_main_grads(params, [torch.ones(4, 4).bfloat16()] * 2)
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
    first = loader._build(compiler)
    stamp = first.stat().st_mtime_ns
    second = loader._build(compiler)
    assert first == second and second.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left


def test_failed_build_names_the_command_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("OLMOE_KERNEL_CACHE", str(tmp_path))
    bad = tmp_path / "bad-cc"
    bad.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo bad-cc 1.0 && exit 0\necho 'no such flag' >&2\nexit 1\n")
    bad.chmod(0o755)
    with pytest.raises(RuntimeError, match="bad-cc.*failed:\n.*no such flag"):
        loader._build(str(bad))
    assert [p.name for p in tmp_path.iterdir()] == ["bad-cc"]


def test_switched_off_by_environment(monkeypatch):
    _torch_path(monkeypatch)
    assert loader.library() is None
    assert not ops.kernels_apply(torch.zeros(2, dtype=torch.bfloat16))


# ----------------------------------------------------------------------------- argument checks
def _bf16(*shape):
    return torch.randn(*shape).bfloat16()


_WRONG_ARGUMENTS = [  # (a call with one wrong argument, the error it must raise)
    (lambda: ops.rms_norm_bf16(torch.randn(4, 16), _bf16(16), 1e-5),
     r"rms_norm_bf16: x has dtype torch.float32; it needs dtype torch.bfloat16"),
    (lambda: ops.rms_norm_bf16(_bf16(16, 4).t(), _bf16(16), 1e-5), r"rms_norm_bf16: x is not contiguous"),
    (lambda: ops.rms_norm_bf16(_bf16(4, 16), _bf16(8), 1e-5),
     r"weight has shape \(8,\); it needs shape \(16,\) \(x's last dimension\)"),
    (lambda: ops.rms_norm_bf16(torch.empty(4, 16, dtype=torch.bfloat16, device="meta"), _bf16(16), 1e-5),
     r"x is on device meta; it needs a CPU tensor"),
    (lambda: ops.vocab_parallel_cross_entropy_bf16(_bf16(5, 2, 32), torch.zeros(2, 5, dtype=torch.long)),
     r"target has shape \(2, 5\); it needs shape \(5, 2\)"),
    (lambda: ops.vocab_parallel_cross_entropy_bf16(_bf16(5, 32), torch.zeros(5)),
     r"target has dtype torch.float32; it needs an integer dtype"),
    (lambda: ops.rope_bf16(_bf16(3, 2, 5), _bf16(3, 5), _bf16(3, 5)), r"rope_bf16: x has head dim 5"),
    (lambda: ops.rope_bf16(_bf16(3, 2, 4), _bf16(4, 4), _bf16(3, 4)),
     r"cos_SD has shape \(4, 4\); it needs shape \(3, 4\)"),
    (lambda: ops.swiglu_probs_forward(_bf16(6, 8), torch.rand(5)), r"probs_P has shape \(5,\); it needs shape \(6,\)"),
    (lambda: ops.swiglu_probs_forward(_bf16(6, 7), torch.rand(6)),
     r"fc1_out_P2F has shape \(6, 7\); it needs an even width"),
    (lambda: ops.swiglu_probs_forward(_bf16(6, 8), torch.rand(6).bfloat16()),
     r"probs_P has dtype torch.bfloat16; it needs dtype torch.float32"),
    (lambda: ops.swiglu_probs_backward(_bf16(6, 4), _bf16(6, 6), torch.rand(6)),
     r"fc1_out_P2F has shape \(6, 6\); it needs shape \(6, 8\)"),
    (lambda: ops.attention_softmax_forward(_bf16(2, 3, 4), causal=True), r"scores_Bqk has dtype torch.bfloat16"),
    (lambda: ops.attention_softmax_forward(torch.randn(3, 4), causal=True),
     r"scores_Bqk has shape \(3, 4\); it needs 3 dimensions"),
    (lambda: ops.attention_softmax_backward(torch.randn(2, 3, 4), _bf16(2, 3, 4), torch.randn(2, 3)),
     r"row_Bq1 has shape \(2, 3\); it needs shape \(2, 3, 1\)"),
    (lambda: ops.widen_bsd(torch.randn(2, 3, 4)), r"widen_bsd: x_Bsd has dtype torch.float32"),
    (lambda: ops.row_dot_bsd(_bf16(2, 3, 4), _bf16(2, 3, 5)),
     r"b_Bsd has shape \(2, 3, 5\); it needs shape \(2, 3, 4\)"),
    (lambda: ops.pad_rows(_bf16(10, 4), [3, 6], [32, 32]),
     r"pad_rows: counts sum to 9; it needs the 10 rows of rows_TX"),
    (lambda: ops.pad_rows(_bf16(10, 4), [3, 7], [32]), r"counts/padded have 2 and 1 entries"),
    (lambda: ops.pad_rows(_bf16(40, 4), [3, 37], [32, 32]), r"give expert 1 37 rows padded to 32"),
    (lambda: ops.unpad_rows(_bf16(60, 4), [3, 7], [32, 32]), r"unpad_rows: padded sums to 64; it needs the 60 rows"),
    (lambda: ops.topk_mask(torch.rand(5, 4), 5), r"topk_mask: k is 5; it needs 1 <= k <= 4"),
    (lambda: ops.topk_mask(torch.rand(5, 4), 0), r"topk_mask: k is 0"),
    (lambda: ops.topk_mask(torch.rand(5, 4).double(), 2),
     r"scores_TE has dtype torch.float64; it needs dtype torch.float32"),
    (lambda: ops.combine_rows(_bf16(6, 4), torch.zeros(6), 3),
     r"token_R has dtype torch.float32; it needs an integer dtype"),
    (lambda: ops.combine_rows(_bf16(6, 4), torch.zeros(5, dtype=torch.long), 3),
     r"token_R has shape \(5,\); it needs shape \(6,\)"),
    (lambda: ops.sum_of_squares([torch.randn(3), _bf16(3)]), r"sum_of_squares: tensors\[1\] has dtype torch.bfloat16"),
    (lambda: ops.sum_of_squares([torch.randn(3, 2).t()]), r"tensors\[0\] is not contiguous"),
    (lambda: ops.accumulate_into_main_grads([torch.nn.Parameter(_bf16(2))], []), r"the lists have lengths"),
]


@pytest.mark.parametrize("call,match", _WRONG_ARGUMENTS,
                         ids=[f"{i}-{m.split(':')[0]}" for i, (_, m) in enumerate(_WRONG_ARGUMENTS)])
def test_a_wrong_tensor_never_reaches_c(call, match):
    with pytest.raises(ops.KernelArgumentError, match=match):
        call()


def test_adamw_step_checks_every_list():
    params = [torch.zeros(4, 3), torch.zeros(5)]
    ok = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=1, grad_scale=1.0)
    grads, moments = [torch.zeros(4, 3), torch.zeros(5)], [torch.zeros(4, 3), torch.zeros(5)]
    with pytest.raises(ops.KernelArgumentError, match=r"adamw_step: the lists have lengths"):
        ops.adamw_step(params, grads[:1], moments, moments, [None, None], **ok)
    with pytest.raises(ops.KernelArgumentError, match=r"grads\[1\] has shape \(6,\); it needs shape \(5,\)"):
        ops.adamw_step(params, [grads[0], torch.zeros(6)], moments, moments, [None, None], **ok)
    with pytest.raises(ops.KernelArgumentError, match=r"model_params \(not None\)\[0\] has dtype torch.float32"):
        ops.adamw_step(params, grads, moments, moments, [None, torch.zeros(5)], **ok)
    with pytest.raises(ops.KernelArgumentError, match=r"step is 0"):
        ops.adamw_step(params, grads, moments, moments, [None, None], **{**ok, "step": 0})
    ops.adamw_step(params, grads, moments, [torch.zeros(4, 3), torch.zeros(5)], [None, _bf16(5)], **ok)  # all fit


def test_argument_errors_are_value_errors_and_kernels_off_is_named(monkeypatch):
    assert issubclass(ops.KernelArgumentError, ValueError)
    _torch_path(monkeypatch)
    with pytest.raises(ops.KernelsUnavailableError, match=r"rms_norm_bf16 called.*switched off"):
        ops.rms_norm_bf16(_bf16(4, 16), _bf16(16), 1e-5)


def test_kernels_apply_is_the_one_decision(monkeypatch):
    x = _bf16(4, 6)
    assert ops.kernels_apply(x, x[:, :3].contiguous())
    assert not ops.kernels_apply(x, x.float())  # fp32 keeps torch's code
    assert not ops.kernels_apply(x.t())
    assert ops.kernels_apply(x.t(), contiguous=False)
    assert ops.kernels_apply(x.float(), dtype=torch.float32) and ops.kernels_apply(x.float(), dtype=None)
    assert not ops.kernels_apply(torch.empty(2, dtype=torch.bfloat16, device="meta"))
    _torch_path(monkeypatch)
    assert not ops.kernels_apply(x)


def test_l2_norm_keeps_each_callers_numerics(monkeypatch):
    generator = torch.Generator().manual_seed(11)
    grads = [torch.randn(300, 7, generator=generator), torch.randn(1000, generator=generator) * 1e-3,
             torch.randn(5, 4, generator=generator).t()]
    # Megatron's l2_norm_impl slot (the CPU backend): the norm of torch's per-tensor norms.
    expected = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).reshape(1).float()
    assert torch.equal(ops.l2_norm(grads), expected)
    # The one-pass optimizer: the square sum accumulated in double, one rounding to fp32.
    squares = ops.sum_of_squares([g.contiguous() for g in grads])
    one_pass = ops.l2_norm(grads, squared=True, one_pass=True)
    assert one_pass.dtype == torch.float32 and one_pass.shape == (1,)
    assert torch.equal(one_pass, torch.tensor([squares], dtype=torch.float32))
    exact = sum(float(g.double().square().sum()) for g in grads)
    assert abs(squares - exact) <= 1e-6 * exact
    assert torch.equal(ops.l2_norm([], squared=True, one_pass=True), torch.zeros(1))
    _torch_path(monkeypatch)  # kernels off: the one-pass request computes the foreach way
    assert torch.equal(ops.l2_norm(grads, squared=True, one_pass=True), expected * expected)
