"""Per-step metrics: a compact console line, a JSONL file and TensorBoard events; MFU.

Model FLOPs per token come from `ModelConfig.flops_per_token` (6 x active matmul parameters plus
attention scores/values, forward + backward, no recompute). MFU divides the achieved model FLOP/s
by the job's peak: on CPU the matmul rate of every rank in the run's precision, measured at start
(all ranks at once, so contention is included); on GPU the device's dense bf16 (or fp8) datasheet
peak times the number of GPUs.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

#: Dense (no sparsity) peak FLOP/s per GPU by device-name fragment: (bf16, fp8).
_GPU_PEAKS = {
    "H200": (989e12, 1979e12),
    "H100": (989e12, 1979e12),
    "H800": (989e12, 1979e12),
    "GH200": (989e12, 1979e12),
    "A100": (312e12, None),
    "L40S": (362e12, 733e12),
}


def measure_matmul_flops(dtype: torch.dtype, *, size: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of square matmuls in `dtype` on this process's threads (the CPU peak for MFU)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    iterations, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        iterations += 1
    return 2 * size**3 * iterations / (time.perf_counter() - start)


def cpu_bf16_is_slow(*, ratio: float = 0.25) -> tuple[bool, float, float]:
    """(slow, bf16 FLOP/s, fp32 FLOP/s) of 256^3 matmuls on this process's threads: slow when bf16
    runs below `ratio` times fp32, as on CPUs without bf16 matrix instructions (AVX2-only x86, where
    oneDNN's bf16 GEMM falls back to a reference loop: 0.9 against 118 GFLOP/s on an AMD EPYC)."""
    bf16 = measure_matmul_flops(torch.bfloat16, size=256, seconds=0.2)
    fp32 = measure_matmul_flops(torch.float32, size=256, seconds=0.2)
    return bf16 < ratio * fp32, bf16, fp32


def job_peak_flops(dtype: torch.dtype, *, fp8: bool = False, override: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of the whole job, how it was obtained). Collective on CPU."""
    world = dist.get_world_size()
    if override is not None:
        return override * world, "metrics.peak_flops per rank"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for fragment, (bf16, fp8_peak) in _GPU_PEAKS.items():
            if fragment in name:
                peak = fp8_peak if fp8 and fp8_peak else bf16
                return peak * world, f"{name} datasheet {'fp8' if fp8 else 'bf16'} peak x {world}"
        return float("nan"), f"unknown GPU {name}: set metrics.peak_flops"
    rate = torch.tensor([measure_matmul_flops(dtype)], dtype=torch.float64)
    dist.all_reduce(rate)
    return float(rate), f"measured {str(dtype).removeprefix('torch.')} matmul rate summed over {world} ranks"


class MetricsWriter:
    """Writes on the logging rank only: console line, JSONL, TensorBoard."""

    def __init__(self, *, enabled: bool, jsonl: str | None, tensorboard_dir: str | None, log_interval: int):
        self.enabled = enabled
        self.log_interval = log_interval
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        if jsonl:
            Path(jsonl).parent.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(jsonl, "a", buffering=1)
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the tensorboard package is an optional extra
                logger.warning("metrics.tensorboard_dir set but tensorboard is not installed "
                               "(pip install 'olmoe-megatron[tb]'); skipping TensorBoard")
            else:
                self._tb = SummaryWriter(tensorboard_dir)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(f"train/{key}", value, step)
            for key, values in (record.get("expert_load") or {}).items():
                for layer, value in enumerate(values):
                    self._tb.add_scalar(f"expert_load/{key}/layer{layer}", value, step)
        if record["step"] % self.log_interval == 0:
            print(format_line(record), flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def format_line(r: dict) -> str:
    load = r.get("expert_load") or {}
    busiest = max(load.get("busiest_expert_share") or [0.0])
    return (
        f"step {r['step']:>6} | loss {r['lm_loss']:.4f} | lb {r['lb_loss']:.4f} | z {r['z_loss']:.5f} | "
        f"gnorm {r['grad_norm']:.3f} | lr {r['lr']:.2e} | tok {r['tokens']:,} | "
        f"{r['tokens_per_s']:,.0f} tok/s | {r['model_tflops']:.3f} TFLOP/s | MFU {100 * r['mfu']:.1f}% | "
        f"busiest expert {100 * busiest:.0f}%"
    )
