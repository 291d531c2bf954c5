"""Fused bf16 CPU kernels, compiled from `cpu_kernels.c` at first use and called through ctypes.

Why: on CPU, each torch operator is a separate pass over memory plus ~10-20 us of dispatch, and
many of torch's elementwise and reduction kernels run far below the memory bandwidth at the
sizes of a training step (a bf16->fp32 RMSNorm is seven operators forward and a dozen backward).
One fused pass per function removes most of that. GPUs keep their own fused paths (Transformer
Engine, apex); fp32 keeps the torch code bit for bit (golden runs and the Megatron reference).

How: the C source is compiled once per machine with the system C compiler (`cc`, or `$CC`) into
`$OLMOE_KERNEL_CACHE` (default `~/.cache/olmoe_megatron/cpu_kernels`), keyed by a hash of the
source, the compiler's version and flags, and the CPU's feature flags (the code is built with
`-march=native`). The file is written under a temporary name and renamed, so concurrent ranks
never load a half-written library. The kernels use OpenMP and link torch's own libgomp, so they
follow `torch.set_num_threads`. No torch headers are involved, so a build takes about a second.

Nothing here is required: without a compiler (or with `OLMOE_CPU_KERNELS=0`) `available()` is
False and callers use their torch implementations, which compute the same functions.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11", "-fno-math-errno")

_lock = threading.Lock()
_state: dict[str, object] = {}

_P, _I64, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "rmsnorm_fwd_bf16": (_P, _P, _P, _P, _I64, _I64, _F32),
    "rmsnorm_bwd_bf16": (_P, _P, _P, _P, _P, _P, _I64, _I64),
    "ce_max_bf16": (_P, _P, _I64, _I64),
    "ce_sum_exp_bf16": (_P, _P, _P, _P, _P, _I64, _I64, _I64),
    "ce_grad_bf16": (_P, _P, _P, _P, _P, _P, _I64, _I64, _I64),
    "swiglu_probs_fwd_bf16": (_P, _P, _P, _I64, _I64),
    "swiglu_probs_bwd_bf16": (_P, _P, _P, _P, _P, _I64, _I64),
    "softmax_fwd_f32_bf16": (_P, _P, _I64, _I64, _I64, ctypes.c_int),
    "softmax_bwd_bf16": (_P, _P, _P, _P, _I64, _I64),
    "add_bf16_to_f32": (_I64, _P, _P, _P),
    "topk_mask_f32": (_P, _P, _I64, _I64, _I64),
    "pad_rows": (_P, _P, _P, _P, _I64, _I64, ctypes.c_int),
    "bf16_to_f32_bsd": (_P, _P, _I64, _I64, _I64, _I64, _I64, _F32),
    "row_dot_bf16": (_P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _I64),
    "combine_rows_bf16": (_P, _P, _P, _I64, _I64, _I64),
    "rope_bf16": (_P, _P, _P, _P, _I64, _I64, _I64, ctypes.c_int),
    "adamw_bf16_step": (_I64, _P, _P, _P, _P, _P, _P, _F32, _F32, _F32, _F32, _F32, _F32, _F32, _F32),
}


def enabled_by_env() -> bool:
    return os.environ.get("OLMOE_CPU_KERNELS", "1") != "0"


def cache_dir() -> Path:
    root = os.environ.get("OLMOE_KERNEL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "olmoe_megatron" / "cpu_kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return os.uname().machine


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, " ".join(CFLAGS), _cpu_flags()]).encode())
    target = cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *CFLAGS, str(SOURCE), "-o", tmp, "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load():
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (cc, gcc or $CC)")
    lib = ctypes.CDLL(str(_build(compiler)))
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = None
    lib.sum_squares_f32.argtypes = (_I64, _P, _P)
    lib.sum_squares_f32.restype = ctypes.c_double
    return lib


def library():
    """The loaded kernel library, or None (no compiler, build failure, or OLMOE_CPU_KERNELS=0)."""
    if not enabled_by_env():
        return None
    with _lock:
        if "lib" not in _state:
            try:
                _state["lib"] = _load()
            except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as exc:
                logger.warning("CPU kernels unavailable, using torch operators instead: %s", exc)
                _state["lib"] = None
    return _state["lib"]


def available() -> bool:
    return library() is not None


def applies(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: bf16, contiguous, on CPU, kernels built."""
    return (
        all(t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.is_contiguous() for t in tensors)
        and available()
    )


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _pointers(tensors) -> ctypes.Array:
    """A C array of the tensors' data pointers (NULL for None)."""
    return (ctypes.c_void_p * len(tensors))(*[_ptr(t) if t is not None else None for t in tensors])


def _int64s(values) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)


# ----------------------------------------------------------------------------- RMSNorm
class _RMSNormBF16(torch.autograd.Function):
    """`w * bf16(x / sqrt(mean(x^2) + eps))` over the last dimension, bf16 in and out."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        width = x.shape[-1]
        rows = x.numel() // width
        y = torch.empty_like(x)
        rstd = torch.empty(rows, dtype=torch.float32)
        library().rmsnorm_fwd_bf16(_ptr(x), _ptr(weight), _ptr(y), _ptr(rstd), rows, width, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dy = dy.to(x.dtype).contiguous()
        width = x.shape[-1]
        dx = torch.empty_like(x)
        dw = torch.empty(width, dtype=torch.float32)
        library().rmsnorm_bwd_bf16(_ptr(dy), _ptr(x), _ptr(weight), _ptr(rstd), _ptr(dx), _ptr(dw),
                                   x.numel() // width, width)
        return dx, dw.to(weight.dtype), None


def rms_norm_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The fused RMSNorm; callers check `applies(x, weight)` first."""
    return _RMSNormBF16.apply(x, weight, eps)


# ----------------------------------------------------------------------------- cross-entropy
class _VocabParallelCrossEntropyBF16(torch.autograd.Function):
    """Megatron's vocab-parallel cross-entropy on bf16 logits [s, b, V/tp], loss [s, b] in fp32.

    Same function as megatron.core.tensor_parallel.vocab_parallel_cross_entropy (no label
    smoothing), same all-reduces over the TP group (max, then target logit and sum of exps), but
    the logits stay bf16: no fp32 copy, no saved fp32 softmax (backward recomputes exp from the
    bf16 logits), and the gradient is written in bf16 directly.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group, vocab_start: int) -> torch.Tensor:
        vocab = logits.shape[-1]
        rows = logits.numel() // vocab
        target_flat = target.reshape(-1).to(torch.int64).contiguous()
        lib = library()
        row_max = torch.empty(rows, dtype=torch.float32)
        lib.ce_max_bf16(_ptr(logits), _ptr(row_max), rows, vocab)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        sum_exp = torch.empty(rows, dtype=torch.float32)
        predicted = torch.empty(rows, dtype=torch.float32)
        lib.ce_sum_exp_bf16(_ptr(logits), _ptr(row_max), _ptr(target_flat), _ptr(sum_exp), _ptr(predicted),
                            rows, vocab, vocab_start)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(predicted, group=group)
            dist.all_reduce(sum_exp, group=group)
        ctx.save_for_backward(logits, row_max, sum_exp, target_flat)
        ctx.vocab_start = vocab_start
        return (torch.log(sum_exp) - predicted).view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, row_max, sum_exp, target_flat = ctx.saved_tensors
        vocab = logits.shape[-1]
        grad_flat = grad_loss.reshape(-1).float().contiguous()
        grad_logits = torch.empty_like(logits)
        library().ce_grad_bf16(_ptr(logits), _ptr(row_max), _ptr(sum_exp), _ptr(target_flat), _ptr(grad_flat),
                               _ptr(grad_logits), logits.numel() // vocab, vocab, ctx.vocab_start)
        return grad_logits, None, None, None


def vocab_parallel_cross_entropy_bf16(logits: torch.Tensor, target: torch.Tensor, *, group=None,
                                      vocab_start: int = 0) -> torch.Tensor:
    """Per-token loss of bf16 logits (this rank's vocabulary slice from `vocab_start`);
    callers check `applies(logits)` first."""
    return _VocabParallelCrossEntropyBF16.apply(logits, target, group, vocab_start)


# ----------------------------------------------------------------------------- SwiGLU with probabilities
def swiglu_probs_forward(fc1_out_P2F: torch.Tensor, probs_P: torch.Tensor) -> torch.Tensor:
    """`bf16(bf16(silu(gate)) * up) * p` per row, rounded to bf16 (gate, up: the halves of fc1_out)."""
    rows, width = fc1_out_P2F.shape[0], fc1_out_P2F.shape[1] // 2
    scaled_PF = fc1_out_P2F.new_empty((rows, width))
    library().swiglu_probs_fwd_bf16(_ptr(fc1_out_P2F), _ptr(probs_P), _ptr(scaled_PF), rows, width)
    return scaled_PF


def swiglu_probs_backward(grad_scaled_PF: torch.Tensor, fc1_out_P2F: torch.Tensor, probs_P: torch.Tensor):
    """(gradient of fc1_out in bf16, gradient of the probabilities in fp32) of `swiglu_probs_forward`."""
    rows, width = grad_scaled_PF.shape
    grad_fc1_out_P2F = torch.empty_like(fc1_out_P2F)
    grad_probs_P = torch.empty(rows, dtype=torch.float32)
    library().swiglu_probs_bwd_bf16(_ptr(grad_scaled_PF), _ptr(fc1_out_P2F), _ptr(probs_P), _ptr(grad_fc1_out_P2F),
                                    _ptr(grad_probs_P), rows, width)
    return grad_fc1_out_P2F, grad_probs_P


# ----------------------------------------------------------------------------- attention softmax
def attention_softmax_forward(scores_Bqk: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """bf16 softmax over the last dimension of fp32 scores [B, s_q, s_k]; `causal` zeroes the keys
    after each query (query i sees keys up to i + s_k - s_q) without a mask tensor."""
    blocks, s_q, s_k = scores_Bqk.shape
    probs_Bqk = torch.empty(scores_Bqk.shape, dtype=torch.bfloat16)
    library().softmax_fwd_f32_bf16(_ptr(scores_Bqk), _ptr(probs_Bqk), blocks, s_q, s_k, int(causal))
    return probs_Bqk


def _bsd_strides_ok(t: torch.Tensor) -> bool:
    return t.dim() == 3 and t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.stride(2) == 1


def widen_bsd(x_Bsd: torch.Tensor, scale: float = 1.0) -> torch.Tensor | None:
    """Contiguous fp32 copy of bf16 [B, s, d] (unit-stride head dim, any other strides) times `scale`;
    None where the layout does not fit (callers then use torch)."""
    if not _bsd_strides_ok(x_Bsd):
        return None
    blocks, seq, dim = x_Bsd.shape
    y = torch.empty((blocks, seq, dim), dtype=torch.float32)
    library().bf16_to_f32_bsd(_ptr(x_Bsd), _ptr(y), blocks, seq, dim, x_Bsd.stride(0), x_Bsd.stride(1), scale)
    return y


def row_dot_bsd(a_Bsd: torch.Tensor, b_Bsd: torch.Tensor) -> torch.Tensor | None:
    """rowsum(a * b) over the head dim of two bf16 [B, s, d] tensors, fp32 [B, s, 1]; None where the
    layouts do not fit."""
    if not (_bsd_strides_ok(a_Bsd) and _bsd_strides_ok(b_Bsd)) or a_Bsd.shape != b_Bsd.shape:
        return None
    blocks, seq, dim = a_Bsd.shape
    out = torch.empty((blocks, seq, 1), dtype=torch.float32)
    library().row_dot_bf16(_ptr(a_Bsd), _ptr(b_Bsd), _ptr(out), blocks, seq, dim,
                           a_Bsd.stride(0), a_Bsd.stride(1), b_Bsd.stride(0), b_Bsd.stride(1))
    return out


def attention_softmax_backward(grad_probs_Bqk: torch.Tensor, probs_Bqk: torch.Tensor, row_Bq: torch.Tensor) -> torch.Tensor:
    """bf16 gradient of the scores, `P * (dP - row)`, with row = rowsum(dO * O) per query (fp32)."""
    grad_scores_Bqk = torch.empty_like(probs_Bqk)
    s_k = probs_Bqk.shape[-1]
    library().softmax_bwd_bf16(_ptr(grad_probs_Bqk), _ptr(probs_Bqk), _ptr(row_Bq), _ptr(grad_scores_Bqk),
                               probs_Bqk.numel() // s_k, s_k)
    return grad_scores_Bqk


# ----------------------------------------------------------------------------- gradient accumulation
def accumulate_into_main_grads(params, grads) -> bool:
    """Adds each bf16 weight gradient into its parameter's fp32 `main_grad` (Megatron DDP's
    buffer) and marks it `grad_added_to_main_grad`, as Megatron's gradient-accumulation fusion
    does, so DDP's hook does not add it again. Returns False (nothing done) unless every
    parameter has an fp32 main_grad and every gradient is a contiguous bf16 tensor."""
    if not available():
        return False
    for param, grad in zip(params, grads):
        main_grad = getattr(param, "main_grad", None)
        if (main_grad is None or not hasattr(param, "grad_added_to_main_grad") or main_grad.dtype != torch.float32
                or not main_grad.is_contiguous() or grad.dtype != torch.bfloat16 or not grad.is_contiguous()
                or main_grad.shape != grad.shape or getattr(param, "zero_out_wgrad", False)):
            return False
    library().add_bf16_to_f32(len(grads), _pointers([p.main_grad for p in params]), _pointers(grads),
                              _int64s([g.numel() for g in grads]))
    for param in params:
        param.grad_added_to_main_grad = True
    return True


# ----------------------------------------------------------------------------- AdamW
def adamw_step(main_params, grads, exp_avgs, exp_avg_sqs, model_params, *, lr: float, beta1: float, beta2: float,
               eps: float, weight_decay: float, step: int, grad_scale: float) -> None:
    """torch's AdamW update of fp32 `main_params` (in place, with their moments) from `grads * grad_scale`,
    also writing each updated weight to its bf16 entry of `model_params` (None: no model copy).

    All fp32 tensors contiguous; `step` is the step count after this update (bias corrections)."""
    library().adamw_bf16_step(
        len(main_params), _pointers(main_params), _pointers(grads), _pointers(exp_avgs), _pointers(exp_avg_sqs),
        _pointers(model_params), _int64s([t.numel() for t in main_params]),
        lr, beta1, beta2, eps, weight_decay, 1.0 - beta1**step, 1.0 - beta2**step, grad_scale,
    )


# ----------------------------------------------------------------------------- rotary embedding
def _rope(x: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor, backward: bool) -> torch.Tensor:
    seq, dim = x.shape[0], x.shape[-1]
    y = torch.empty_like(x)
    library().rope_bf16(_ptr(x), _ptr(cos_SD), _ptr(sin_SD), _ptr(y), seq, x.numel() // (seq * dim), dim, int(backward))
    return y


class _RopeBF16(torch.autograd.Function):
    """Megatron's unfused rotate-half RoPE on bf16 [s, ..., d] with bf16 cos/sin tables [s, d]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos_SD, sin_SD)
        return _rope(x, cos_SD, sin_SD, backward=False)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        cos_SD, sin_SD = ctx.saved_tensors
        return _rope(grad_y.to(torch.bfloat16).contiguous(), cos_SD, sin_SD, backward=True), None, None


def rope_bf16(x: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    """RoPE of contiguous bf16 `x` [s, ..., d] (rotate-half layout, the whole head dim rotated)."""
    return _RopeBF16.apply(x, cos_SD.contiguous(), sin_SD.contiguous())


# ----------------------------------------------------------------------------- router top-k
def topk_mask(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean [T, E]: each row's k largest fp32 scores (ties to the lower index; NaN counts as largest)."""
    scores_TE = scores_TE.contiguous()
    mask_TE = torch.empty(scores_TE.shape, dtype=torch.bool)
    rows, width = scores_TE.shape
    library().topk_mask_f32(_ptr(scores_TE), _ptr(mask_TE), rows, width, k)
    return mask_TE


# ----------------------------------------------------------------------------- gradient norm
def sum_of_squares(tensors) -> float:
    """sum(t ** 2) over contiguous fp32 CPU tensors, accumulated in double."""
    if not tensors:
        return 0.0
    return library().sum_squares_f32(len(tensors), _pointers(tensors), _int64s([t.numel() for t in tensors]))


# ----------------------------------------------------------------------------- expert row padding
def pad_rows(rows_TX: torch.Tensor, counts: list[int], padded: list[int]) -> torch.Tensor:
    """Rows grouped by expert ([T, ...], `counts[e]` each) into `padded[e]` rows per expert, the extra
    rows zero: `experts._scatter_rows` for the contiguous layout, each row written once."""
    rows_TX = rows_TX.contiguous()
    out = rows_TX.new_empty((sum(padded), *rows_TX.shape[1:]))
    _pad_call(rows_TX, out, counts, padded, unpad=False)
    return out


def unpad_rows(rows_PX: torch.Tensor, counts: list[int], padded: list[int]) -> torch.Tensor:
    """The inverse of `pad_rows`: each expert's first `counts[e]` rows."""
    rows_PX = rows_PX.contiguous()
    out = rows_PX.new_empty((sum(counts), *rows_PX.shape[1:]))
    _pad_call(rows_PX, out, counts, padded, unpad=True)
    return out


def _pad_call(src: torch.Tensor, dst: torch.Tensor, counts: list[int], padded: list[int], *, unpad: bool) -> None:
    experts = len(counts)
    row_bytes = src[0].numel() * src.element_size() if src.shape[0] else 0
    library().pad_rows(_ptr(src), _ptr(dst), _int64s(counts), _int64s(padded),
                       experts, row_bytes, int(unpad))


# ----------------------------------------------------------------------------- MoE unpermute
class _CombineRows(torch.autograd.Function):
    """out[t] = sum of rows_RH[r] over r with token_R[r] == t (Megatron's unpermute without probs)."""

    @staticmethod
    def forward(ctx, rows_RH: torch.Tensor, token_R: torch.Tensor, num_tokens: int) -> torch.Tensor:
        rows_RH = rows_RH.contiguous()
        token_R = token_R.to(torch.int64).contiguous()
        out_TH = rows_RH.new_empty((num_tokens, rows_RH.shape[1]))
        library().combine_rows_bf16(_ptr(rows_RH), _ptr(token_R), _ptr(out_TH), rows_RH.shape[0], num_tokens,
                                    rows_RH.shape[1])
        ctx.save_for_backward(token_R)
        return out_TH

    @staticmethod
    def backward(ctx, grad_TH: torch.Tensor):
        (token_R,) = ctx.saved_tensors
        return grad_TH.index_select(0, token_R), None, None  # scatter_add's gradient: a gather


def combine_rows(rows_RH: torch.Tensor, token_R: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Sums bf16 rows into their tokens' rows ([R, H] -> [num_tokens, H]); callers check `applies`."""
    return _CombineRows.apply(rows_RH, token_R, num_tokens)
