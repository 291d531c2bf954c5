"""Per-step metrics: a compact console line, a JSONL file and TensorBoard events; MFU.

Model FLOPs per token come from `ModelConfig.flops_per_token` (6 x active matmul parameters plus
attention scores/values, forward + backward, no recompute). MFU divides the achieved model FLOP/s
by the job's peak: on CPU the matmul rate of every rank in the run's precision, measured at start
(all ranks at once, so contention is included); on GPU the device's dense bf16 (or, for FP8 runs,
fp8) datasheet peak times the number of GPUs. The record names the peak (`mfu_peak`) and also gives
MFU against the bf16 peak (`mfu_bf16`), so FP8 and bf16 runs compare.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

#: Dense (no sparsity) peak FLOP/s per GPU: (name pattern, bf16, fp8 or None), matched against
#: `torch.cuda.get_device_name()` ('NVIDIA H100 80GB HBM3', 'NVIDIA H100 PCIe', 'NVIDIA H200 NVL',
#: 'NVIDIA GH200 480GB', 'NVIDIA H20', ...) as whole words, most specific first. NVIDIA's datasheets
#: print the tensor-core peaks with 2:4 sparsity; the dense peak is half of that.
_GPU_PEAKS: tuple[tuple[str, float, float | None], ...] = (
    # GH200 Grace Hopper datasheet: the H100 SXM numbers (BF16 1,979 / FP8 3,958 sparse).
    ("GH200", 989e12, 1979e12),
    # GB200 NVL72 datasheet per GPU (rack / 72): BF16 360 PF, FP8 720 PF sparse.
    ("GB200", 2500e12, 5000e12),
    # H200 datasheet, NVL column: BF16 1,671 / FP8 3,341 TFLOPS sparse.
    ("H200 NVL", 835e12, 1671e12),
    # H200 datasheet, SXM column: BF16 1,979 / FP8 3,958 TFLOPS sparse.
    ("H200", 989e12, 1979e12),
    # H100 datasheet, PCIe column: BF16 1,513 / FP8 3,026 TFLOPS sparse.
    ("H100 PCIe", 756e12, 1513e12),
    # H100 datasheet, NVL column (per GPU since the 2024 revision): BF16 1,671 / FP8 3,341 sparse.
    ("H100 NVL", 835e12, 1671e12),
    # H100 datasheet, SXM column: BF16 1,979 / FP8 3,958 TFLOPS sparse.
    ("H100", 989e12, 1979e12),
    # H800: the H100's compute (PCIe and SXM) with less interconnect bandwidth.
    ("H800 PCIe", 756e12, 1513e12),
    ("H800", 989e12, 1979e12),
    # H20 product brief: BF16 148 / FP8 296 TFLOPS dense.
    ("H20", 148e12, 296e12),
    # HGX B200 datasheet per GPU (8-GPU board / 8): BF16 36 PF, FP8 72 PF sparse.
    ("B200", 2250e12, 4500e12),
    # HGX B100 datasheet per GPU (board / 8): BF16 28 PF, FP8 56 PF sparse.
    ("B100", 1750e12, 3500e12),
    # A100 datasheet (SXM and PCIe): BF16 312 dense (624 sparse); no FP8 tensor cores.
    ("A100", 312e12, None),
    # L40S datasheet: BF16 362.05 / FP8 733 dense (733 / 1,466 sparse).
    ("L40S", 362e12, 733e12),
)


@dataclasses.dataclass(frozen=True)
class PeakFlops:
    """The job's peak that MFU divides by, and the bf16 peak for `mfu_bf16`."""

    flops: float
    """Peak FLOP/s of the whole job (NaN: unknown GPU, set metrics.peak_flops)."""
    kind: str
    """Which peak `flops` is: 'bf16' (GPU datasheet or CPU measurement), 'fp8' (GPU datasheet),
    'fp32' (CPU measurement) or 'metrics.peak_flops' (given)."""
    bf16_flops: float | None
    """The job's bf16 peak (None: not known, e.g. a CPU run in fp32)."""
    source: str
    """How `flops` was obtained (logged at start)."""


def gpu_peak(device_name: str) -> tuple[str, float, float | None] | None:
    """(matched name, dense bf16, dense fp8 or None) FLOP/s per GPU for a CUDA device name; None if unknown."""
    for pattern, bf16, fp8 in _GPU_PEAKS:
        if re.search(rf"\b{re.escape(pattern)}\b", device_name, flags=re.IGNORECASE):
            return pattern, bf16, fp8
    return None


def gpu_job_peak(device_name: str, *, world: int, fp8: bool) -> PeakFlops:
    """The datasheet peak of `world` GPUs named `device_name`: fp8 for FP8 runs where the GPU has one."""
    found = gpu_peak(device_name)
    if found is None:
        return PeakFlops(flops=float("nan"), kind="fp8" if fp8 else "bf16", bf16_flops=None,
                         source=f"unknown GPU {device_name}: set metrics.peak_flops")
    pattern, bf16, fp8_peak = found
    use_fp8 = fp8 and fp8_peak is not None
    kind = "fp8" if use_fp8 else "bf16"
    note = " (it has no fp8 peak)" if fp8 and not use_fp8 else ""
    return PeakFlops(flops=(fp8_peak if use_fp8 else bf16) * world, kind=kind, bf16_flops=bf16 * world,
                     source=f"{device_name} ({pattern}) datasheet dense {kind} peak x {world}{note}")


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


def x86_bf16_instructions(cpuinfo: str | None = None) -> bool | None:
    """Whether this x86 CPU has bf16 matrix instructions (the avx512_bf16 or amx_bf16 flag of
    /proc/cpuinfo); None where that cannot be told (not Linux x86)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
                cpuinfo = handle.read()
        except OSError:
            return None
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), None)
    if flags is None:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_bf16_is_slow(*, ratio: float = 0.25) -> tuple[bool, float, float]:
    """(slow, bf16 FLOP/s, fp32 FLOP/s) of 256^3 matmuls on this process's threads.

    On x86 Linux the CPU flags decide: without avx512_bf16 or amx_bf16, oneDNN's bf16 GEMM falls
    back to a reference loop (0.9 against 118 GFLOP/s in fp32 on an AMD EPYC). Elsewhere bf16 is
    slow when it runs below `ratio` times fp32 (a 0.2 s probe each, which a loaded machine can skew,
    hence the flags first)."""
    bf16 = measure_matmul_flops(torch.bfloat16, size=256, seconds=0.2)
    fp32 = measure_matmul_flops(torch.float32, size=256, seconds=0.2)
    has_instructions = x86_bf16_instructions()
    if has_instructions is not None:
        return not has_instructions, bf16, fp32
    return bf16 < ratio * fp32, bf16, fp32


def job_peak_flops(dtype: torch.dtype, *, fp8: bool = False, override: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of the whole job, how it was obtained). Collective on CPU."""
    world = dist.get_world_size()
    if override is not None:
        return override * world, "metrics.peak_flops per rank"
    if torch.cuda.is_available():
        peak = gpu_job_peak(torch.cuda.get_device_name(), world=world, fp8=fp8)
        return peak.flops, peak.source
    rate = torch.tensor([measure_matmul_flops(dtype)], dtype=torch.float64,
                        device="cuda" if dist.get_backend() == "nccl" else "cpu")  # the default group's device
    dist.all_reduce(rate)
    return float(rate), f"measured {str(dtype).removeprefix('torch.')} matmul rate summed over {world} ranks"


def job_peak(dtype: torch.dtype, *, fp8: bool = False, override: float | None = None) -> PeakFlops:
    """`job_peak_flops` with which peak it is and the bf16 peak beside it. Collective on CPU."""
    flops, source = job_peak_flops(dtype, fp8=fp8, override=override)
    world = dist.get_world_size()
    gpu = gpu_job_peak(torch.cuda.get_device_name(), world=world, fp8=fp8) if torch.cuda.is_available() else None
    if override is not None:
        return PeakFlops(flops=flops, kind="metrics.peak_flops", bf16_flops=gpu.bf16_flops if gpu else None,
                         source=source)
    if gpu is not None:
        return gpu
    kind = "bf16" if dtype == torch.bfloat16 else "fp32"
    return PeakFlops(flops=flops, kind=kind, bf16_flops=flops if kind == "bf16" else None, source=source)


def throughput_fields(
    *, tokens_per_step: int, data_wait_s: float, compute_s: float, flops_per_token: float, peak: PeakFlops
) -> dict:
    """A step's timing and throughput record fields; the step is data loading plus compute."""
    step_time_s = data_wait_s + compute_s
    tokens_per_s = tokens_per_step / step_time_s
    model_flops = tokens_per_s * flops_per_token
    return {
        "step_time_s": step_time_s,
        "data_wait_s": data_wait_s,
        "tokens_per_s": tokens_per_s,
        "model_tflops": model_flops / 1e12,
        "mfu": model_flops / peak.flops,
        "mfu_peak": peak.kind,
        "mfu_bf16": model_flops / peak.bf16_flops if peak.bf16_flops else None,
    }


def peak_memory_fields(*, uses_cuda: bool, cuda=torch.cuda) -> dict:
    """Peak memory since the last call: on CUDA the caching allocator's max allocated and max
    reserved bytes, whose peaks are then reset (so each record is its own interval); on CPU the
    process's peak resident set (never reset), reserved None.

    Args:
        uses_cuda: the ranks run on CUDA devices.
        cuda: the module with the allocator statistics (torch.cuda; tests pass a stand-in).
    """
    if uses_cuda:
        fields = {"peak_mem_bytes": int(cuda.max_memory_allocated()),
                  "peak_reserved_bytes": int(cuda.max_memory_reserved())}
        cuda.reset_peak_memory_stats()
        return fields
    import resource

    return {"peak_mem_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
            "peak_reserved_bytes": None}


def scalars(record: dict) -> dict[str, float]:
    """A training record's scalars as TensorBoard and W&B get them: train/<key> for every number
    but the step, expert_load/<statistic>/layer<i> for the per-layer expert load."""
    out = {f"train/{key}": value for key, value in record.items()
           if isinstance(value, (int, float)) and key != "step"}
    for key, values in (record.get("expert_load") or {}).items():
        for layer, value in enumerate(values):
            out[f"expert_load/{key}/layer{layer}"] = value
    return out


def _wandb_credentials() -> bool:
    """An API key in the environment or a `wandb login` (~/.netrc entry for api.wandb.ai)."""
    import netrc
    import os

    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbRun:
    """One Weights & Biases run for a training run (the logging rank only).

    Its id is derived from the checkpoint directory, so a resumed or requeued job continues the
    same W&B run (resume='allow'); without a checkpoint directory every start is a new run.
    """

    def __init__(self, settings, *, run_config: dict, run_name: str, checkpoint_dir: str | None):
        import hashlib
        import os

        from olmoe_megatron.config import ConfigError

        try:
            import wandb
        except ImportError:
            raise ConfigError(f"metrics.wandb_project={settings.wandb_project!r} is set but wandb is not installed: "
                              "pip install 'olmoe-megatron[wandb]', or unset metrics.wandb_project") from None
        mode = settings.wandb_mode
        if mode == "auto":
            mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_credentials() else "offline")
        directory = Path(settings.wandb_dir or checkpoint_dir or os.getcwd())
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"metrics.wandb_dir={str(directory)!r} cannot be created ({exc.strerror or exc}); "
                              "give a writable directory (--metrics.wandb_dir=PATH)") from None
        run_id = None
        if checkpoint_dir:
            key = f"{settings.wandb_project}:{os.path.abspath(checkpoint_dir)}"
            run_id = hashlib.sha256(key.encode()).hexdigest()[:16]
        self.mode = mode
        self.run = wandb.init(project=settings.wandb_project, entity=settings.wandb_entity,
                              name=settings.wandb_name or run_name, tags=list(settings.wandb_tags),
                              config=run_config, mode=mode, dir=str(directory), id=run_id, resume="allow")
        logger.info("W&B run %s (%s) in %s", self.run.id, mode, directory)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsWriter:
    """Writes on the logging rank only: console line, JSONL, TensorBoard, W&B."""

    def __init__(self, *, enabled: bool, jsonl: str | None, tensorboard_dir: str | None, log_interval: int,
                 wandb_run: Callable[[], WandbRun] | None = None):
        """`wandb_run`: builds the W&B run (called on the logging rank only; None: no W&B)."""
        self.enabled = enabled
        self.log_interval = log_interval
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        if jsonl:
            try:
                Path(jsonl).parent.mkdir(parents=True, exist_ok=True)
                self._jsonl = open(jsonl, "a", buffering=1)
            except OSError as exc:
                from olmoe_megatron.config import ConfigError

                raise ConfigError(f"metrics.jsonl={jsonl!r} cannot be written ({exc.strerror or exc}); give a "
                                  "writable file path (--metrics.jsonl=PATH)") from None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the tensorboard package is an optional extra
                logger.warning("metrics.tensorboard_dir set but tensorboard is not installed "
                               "(pip install 'olmoe-megatron[tb]'); skipping TensorBoard")
            else:
                self._tb = SummaryWriter(tensorboard_dir)
        if wandb_run is not None:
            self._wandb = wandb_run()

    def _scalars(self, values: dict[str, float], step: int) -> None:
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(values, step)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
        self._scalars(scalars(record), record["step"])
        if record["step"] % self.log_interval == 0:
            print(format_line(record), flush=True)

    def write_eval(self, *, step: int, tokens: int, metrics: dict[str, float]) -> None:
        """An evaluation record: JSONL {"kind": "eval", "step", "tokens", "eval/<name>/<metric>": ...},
        TensorBoard and W&B scalars under their own names, and one console line (always printed)."""
        if not self.enabled:
            return
        from olmoe_megatron.evaluation.evaluator import format_eval_line

        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"kind": "eval", "step": step, "tokens": tokens, **metrics}) + "\n")
        self._scalars(dict(metrics), step)
        print(format_eval_line(step, metrics), flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()


def format_line(r: dict) -> str:
    load = r.get("expert_load") or {}
    busiest = max(load.get("busiest_expert_share") or [0.0])
    fp8 = ""
    if r.get("mfu_peak") == "fp8":
        fp8 = f" of fp8 peak ({100 * r['mfu_bf16']:.1f}% of bf16)" if r.get("mfu_bf16") else " of fp8 peak"
    bias = ""
    if load.get("expert_bias_min"):  # aux-loss-free balancing: the bias range over all layers
        bias = f" | expert bias {min(load['expert_bias_min']):+.4f}..{max(load['expert_bias_max']):+.4f}"
    return (
        f"step {r['step']:>6} | loss {r['lm_loss']:.4f} | lb {r['lb_loss']:.4f} | z {r['z_loss']:.5f} | "
        f"gnorm {r['grad_norm']:.3f} | lr {r['lr']:.2e} | tok {r['tokens']:,} | "
        f"{r['tokens_per_s']:,.0f} tok/s | {r['model_tflops']:.3f} TFLOP/s | MFU {100 * r['mfu']:.1f}%{fp8} | "
        f"busiest expert {100 * busiest:.0f}%{bias}"
    )
