"""Megatron-Core 0.16.1 on a CPU-only torch, over gloo.

Megatron-Core assumes CUDA throughout: `torch.cuda.current_device()` as a device argument,
CUDA streams and events, a CUDA RNG tracker, hard-coded `device="cuda"` in factories, and
`Tensor.type()` strings checked against `torch.cuda.*`. It also has two bugs that only show
without Transformer Engine, and the all-to-all / all-gather paths rely on NCCL behaviour that
gloo lacks. Each patch below fixes one of these; `install()` applies them all, once, and only
when CUDA is absent. Every patch has a probe (`PATCHES[name].probe`) that returns True while
upstream still needs it; tests/parallel/test_cpu_backend.py runs each probe in a fresh process,
so a new megatron-core that no longer needs a patch (or a patch that stops applying) fails a test.

Ablation: OLMOE_CPU_BACKEND_DISABLE=name1,name2 skips patches (to show what breaks without them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from typing import Callable

import torch

logger = logging.getLogger(__name__)

#: The megatron-core release the patches were written and tested against.
SUPPORTED_MCORE_VERSION = "0.16.1"

_installed: list[str] = []


@dataclasses.dataclass(frozen=True)
class Patch:
    name: str
    reason: str
    apply: Callable[[], None]
    probe: Callable[[], bool]
    """True while unpatched megatron-core/torch still shows the problem (run before install)."""


# ----------------------------------------------------------------------------- no-op CUDA objects
class _NoopEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end_event):
        return 0.0


class _NoopStream:
    cuda_stream = 0
    device = torch.device("cpu")

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _NoopEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_DEFAULT_STREAM = _NoopStream()


class _CompletedWork:
    """What an async collective returns once it has already run synchronously."""

    def wait(self, *args, **kwargs):
        return True

    def is_completed(self):
        return True


def _raises(fn: Callable[[], object]) -> bool:
    try:
        fn()
    except Exception:  # noqa: BLE001 - any failure means the problem is still there
        return True
    return False


# ----------------------------------------------------------------------------- patches
def _apply_current_device():
    torch.cuda.current_device = lambda: torch.device("cpu")


def _apply_streams():
    torch.cuda.Stream = _NoopStream
    torch.cuda.Event = _NoopEvent
    torch.cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    torch.cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda device=None: None


def _apply_rng():
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the generator directly.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.random.set_rng_state = torch.cuda.set_rng_state
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)
    # One generator serves "CPU" and "CUDA": the tracker's warning that the CPU state changed
    # inside a CUDA RNG context is then always true and meaningless.
    logging.getLogger(mrandom.__name__).addFilter(lambda rec: "CPU RNG state changed" not in rec.getMessage())


def _apply_tensor_cuda():
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self


def _apply_nvtx():
    torch.cuda.nvtx.range_push = lambda *args, **kwargs: None
    torch.cuda.nvtx.range_pop = lambda *args, **kwargs: None
    torch.cuda.nvtx.range = lambda *args, **kwargs: contextlib.nullcontext()


_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "empty_like", "zeros_like",
              "ones_like", "full_like", "rand", "randn", "randint", "randperm", "linspace", "eye",
              "as_tensor")
_TENSOR_FACTORIES = ("new_zeros", "new_empty", "new_ones", "new_full", "new_tensor")


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _cpu_kwargs(kwargs: dict) -> dict:
    if "device" in kwargs and _is_cuda(kwargs["device"]):
        kwargs["device"] = "cpu"
    if kwargs.get("pin_memory"):
        kwargs["pin_memory"] = False
    return kwargs


def _apply_device_cuda():
    # A TorchFunctionMode would be simpler, but it is disabled inside its own handler, so code
    # that autograd runs (activation recompute) loses the rewrite; plain wrappers do not.
    def wrap(fn):
        def factory(*args, **kwargs):
            return fn(*args, **_cpu_kwargs(kwargs))

        factory.__name__ = fn.__name__
        factory.__wrapped__ = fn
        return factory

    def wrap_method(fn):
        def method(self, *args, **kwargs):
            return fn(self, *args, **_cpu_kwargs(kwargs))

        method.__name__ = fn.__name__
        return method

    for name in _FACTORIES:
        setattr(torch, name, wrap(getattr(torch, name)))
    for name in _TENSOR_FACTORIES:
        setattr(torch.Tensor, name, wrap_method(getattr(torch.Tensor, name)))
    original_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and _is_cuda(args[0]):
            args = ("cpu",) + tuple(args[1:])
        return original_to(self, *args, **_cpu_kwargs(kwargs))

    torch.Tensor.to = to
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self


def _apply_type_cuda():
    original_type = torch.Tensor.type

    def type_(self, *args, **kwargs):
        name = original_type(self, *args, **kwargs)
        if (not args and not kwargs and isinstance(name, str) and ".cuda." not in name
                and "/megatron/core/" in sys._getframe(1).f_code.co_filename):
            return name.replace("torch.", "torch.cuda.", 1)
        return name

    torch.Tensor.type = type_


def _apply_te_gemm_none():
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _apply_a2a_splits():
    from megatron.core.transformer.moe import token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor):
            return tensor.detach().to("cpu").numpy().copy()
        return tensor

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _apply_gloo_uneven_all_gather():
    import torch.distributed as dist

    original_all_gather = dist.all_gather

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        if len({tuple(t.shape) for t in tensor_list}) <= 1:
            return original_all_gather(tensor_list, tensor, group=group, async_op=async_op)
        # Megatron gathers uneven sizes along dim 0 only: pad to the largest, gather, slice.
        rows = max(t.shape[0] for t in tensor_list)
        padded = tensor.new_zeros((rows,) + tuple(tensor.shape[1:]))
        padded[: tensor.shape[0]].copy_(tensor)
        buffers = [torch.empty_like(padded) for _ in tensor_list]
        original_all_gather(buffers, padded, group=group)
        for out, buf in zip(tensor_list, buffers):
            out.copy_(buf[: out.shape[0]])
        return _CompletedWork() if async_op else None

    dist.all_gather = all_gather


def _apply_no_compile():
    import torch._dynamo

    torch._dynamo.config.disable = True


def _apply_recompute_fp8():
    from megatron.core.tensor_parallel import random as mrandom

    original_init = mrandom.CheckpointWithoutOutput.__init__

    def __init__(self, fp8=False):
        original_init(self, fp8=None if fp8 is False else fp8)

    mrandom.CheckpointWithoutOutput.__init__ = __init__


def _apply_fork_results_queue():
    import multiprocessing as mp

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    # The async writer's results queue lives in a 'spawn' Manager: a new interpreter per rank
    # that re-imports __main__ (~3-9 s per save on 2 cores). A fork-context Manager is the same
    # queue without the re-import; it is created on the first save, as upstream does.
    def _get_write_results_queue():
        if filesystem_async._results_queue is None:
            filesystem_async._results_queue = mp.get_context("fork").Manager().Queue()
        return filesystem_async._results_queue

    filesystem_async._get_write_results_queue = _get_write_results_queue


def _apply_dist_opt_step_state():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" in tensors or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        # torch.optim.Adam keeps a per-parameter "step"; the checkpoint carries it in the param
        # groups (already restored by load_state_dict), not among the per-parameter tensors.
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        main_param.detach().copy_(tensors["param"])
        for key, value in state.items():
            if key != "step":
                value.copy_(tensors[key])

    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    original_load = DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        original_load(self, state_dict)
        # The loader gives every parameter the SAME "step" tensor; torch Adam increments it in
        # place once per parameter, so bias correction runs away after a resume. Untie them.
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    DistributedOptimizer.load_state_dict = load_state_dict


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """amp_C.multi_tensor_l2norm's contract on torch's foreach kernels: ([total norm], None)."""
    norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1).float(), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """amp_C.multi_tensor_scale's contract (dst = src * scale) on torch's foreach kernels."""
    src, dst = tensor_lists
    if scale == 1.0:
        torch._foreach_copy_(dst, src)  # a cast copy, without megatron's fallback's `src * 1.0`
    elif all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def _apply_foreach_multi_tensor():
    from megatron.core.optimizer import clip_grads, optimizer

    clip_grads.l2_norm_impl = _foreach_l2_norm
    clip_grads.multi_tensor_scale_impl = _foreach_scale
    optimizer.multi_tensor_scale_impl = _foreach_scale


# ----------------------------------------------------------------------------- probes
def _probe_current_device() -> bool:
    return _raises(torch.cuda.current_device)


def _probe_streams() -> bool:
    return _raises(torch.cuda.Stream)


def _probe_rng() -> bool:
    return _raises(lambda: torch.cuda.get_rng_state().sum())


def _probe_tensor_cuda() -> bool:
    return _raises(lambda: torch.zeros(1).cuda())


def _probe_nvtx() -> bool:
    return _raises(lambda: (torch.cuda.nvtx.range_push("x"), torch.cuda.nvtx.range_pop()))


def _probe_device_cuda() -> bool:
    return _raises(lambda: torch.zeros(1, device="cuda"))


def _probe_type_cuda() -> bool:
    """Megatron asserts CUDA type names; a call made from a megatron-core frame must see one."""
    import inspect

    from megatron.core.optimizer import clip_grads

    still_asserted = "torch.cuda.FloatTensor" in inspect.getsource(clip_grads)
    as_seen_by_megatron = eval(compile("t.type()", "/site-packages/megatron/core/probe.py", "eval"), {"t": torch.zeros(1)})
    return still_asserted and ".cuda." not in as_seen_by_megatron


def _probe_te_gemm_none() -> bool:
    from megatron.core.transformer.moe import moe_utils

    return not hasattr(moe_utils, "te_general_gemm")


def _probe_a2a_splits() -> bool:
    from megatron.core.transformer.moe import token_dispatcher

    return torch.is_tensor(token_dispatcher.maybe_move_tensor_to_cpu(torch.ones(2), as_numpy=True))


def _probe_gloo_uneven_all_gather() -> bool:
    """gloo rejects an all_gather of unequal sizes (needs a process group; True without one)."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    if not dist.is_initialized():
        return True
    sizes = [1 + r for r in range(dist.get_world_size())]
    outs = [torch.empty(n) for n in sizes]
    mine = torch.ones(sizes[dist.get_rank()])
    gather = dist.all_gather if "gloo_uneven_all_gather" in _installed else distributed_c10d.all_gather
    return _raises(lambda: gather(outs, mine))


def _probe_no_compile() -> bool:
    import torch._dynamo
    from megatron.core import jit

    return jit.jit_fuser is torch.compile and not torch._dynamo.config.disable


def _probe_recompute_fp8() -> bool:
    from megatron.core.tensor_parallel import random as mrandom

    return mrandom.CheckpointWithoutOutput(fp8=False).fp8 is True


def _probe_fork_results_queue() -> bool:
    import inspect

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    return 'get_context("spawn")' in inspect.getsource(filesystem_async._get_write_results_queue)


def _probe_dist_opt_step_state() -> bool:
    import inspect

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    setter = inspect.getsource(DistributedOptimizer._set_main_param_and_optimizer_states)
    loader = inspect.getsource(DistributedOptimizer.load_state_dict)
    return ("dst_tensors[key].copy_(tensors[key])" in setter and "step" not in setter) or (
        's["step"] = step\n' in loader
    )


def _probe_foreach_multi_tensor() -> bool:
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    return utils.local_multi_tensor_scale in (clip_grads.multi_tensor_scale_impl, optimizer.multi_tensor_scale_impl) or (
        clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm
    )


PATCHES: dict[str, Patch] = {
    p.name: p
    for p in [
        Patch("current_device", "megatron passes torch.cuda.current_device() as device= everywhere; "
              "a CPU torch raises 'Torch not compiled with CUDA enabled'", _apply_current_device,
              _probe_current_device),
        Patch("streams", "MoE dispatch, p2p and checkpoint code create CUDA streams/events and call "
              "torch.cuda.synchronize; on CPU they are no-ops", _apply_streams, _probe_streams),
        Patch("rng", "megatron's RNG tracker forks the CUDA generator; on CPU the default generator "
              "plays that role", _apply_rng, _probe_rng),
        Patch("tensor_cuda", "Tensor.cuda()/Module.cuda() calls in megatron keep tensors on CPU",
              _apply_tensor_cuda, _probe_tensor_cuda),
        Patch("nvtx", "NVTX ranges around MoE and pipeline code need CUDA", _apply_nvtx, _probe_nvtx),
        Patch("device_cuda", "schedules, optimizer, clip_grads and utils build tensors with "
              "device='cuda' (and pin_memory=True)", _apply_device_cuda, _probe_device_cuda),
        Patch("type_cuda", "the optimizer, clip_grads and the distributed optimizer assert "
              "Tensor.type() == 'torch.cuda.FloatTensor'", _apply_type_cuda, _probe_type_cuda),
        Patch("te_gemm_none", "megatron-core 0.16.1 bug without Transformer Engine: "
              "moe_utils.te_general_gemm is never defined, so every router raises NameError",
              _apply_te_gemm_none, _probe_te_gemm_none),
        Patch("a2a_splits", "the alltoall dispatcher converts split sizes to numpy only for CUDA "
              "tensors; gloo's all_to_all_single rejects tensor split sizes", _apply_a2a_splits,
              _probe_a2a_splits),
        Patch("gloo_uneven_all_gather", "gloo's all_gather needs equal sizes; megatron gathers "
              "uneven token counts (alltoall dispatcher with TP/ETP > 1)",
              _apply_gloo_uneven_all_gather, _probe_gloo_uneven_all_gather),
        Patch("no_compile", "megatron's jit_fuser is torch.compile; inductor compiles C++ on the "
              "first call (5-28 s per process on 2 cores) for no gain at these sizes",
              _apply_no_compile, _probe_no_compile),
        Patch("recompute_fp8", "megatron-core 0.16.1 bug: CheckpointWithoutOutput(fp8=False) sets "
              "fp8=True and selective recompute then needs TE's FP8 state", _apply_recompute_fp8,
              _probe_recompute_fp8),
        Patch("fork_results_queue", "dist_checkpointing's async writer starts a 'spawn' Manager "
              "that re-imports __main__ (seconds per save, and hangs scripts without a main guard)",
              _apply_fork_results_queue, _probe_fork_results_queue),
        Patch("dist_opt_step_state", "megatron-core 0.16.1 bugs without apex/TE: loading a "
              "'fully_reshardable' distributed-optimizer checkpoint copies torch Adam's per-parameter "
              "'step', which the checkpoint does not hold (KeyError), and gives all parameters one "
              "shared 'step' tensor that Adam then increments once per parameter", _apply_dist_opt_step_state,
              _probe_dist_opt_step_state),
        Patch("foreach_multi_tensor", "speed, not correctness: without apex/TE, megatron's grad-norm, "
              "clipping and main-to-model parameter copies fall back to Python loops with one kernel "
              "per tensor and a scaled temporary (`src * 1.0` to copy); torch's foreach kernels do the "
              "same maths (7 -> 3 ms per olmoe_small step for the copy and the clip scaling)", _apply_foreach_multi_tensor,
              _probe_foreach_multi_tensor),
    ]
}


def _disabled() -> set[str]:
    names = {n.strip() for n in os.environ.get("OLMOE_CPU_BACKEND_DISABLE", "").split(",") if n.strip()}
    unknown = names - PATCHES.keys()
    if unknown:
        raise ValueError(
            f"OLMOE_CPU_BACKEND_DISABLE names unknown patches {sorted(unknown)}; known: {sorted(PATCHES)}"
        )
    return names


def check_megatron_version() -> None:
    import megatron.core

    version = megatron.core.__version__
    if version != SUPPORTED_MCORE_VERSION:
        raise RuntimeError(
            f"the CPU backend patches megatron-core {SUPPORTED_MCORE_VERSION}, but {version} is "
            f"installed; install megatron-core=={SUPPORTED_MCORE_VERSION} (each patch has a probe "
            "in tests/parallel/test_cpu_backend.py to re-check against a new release)"
        )


def installed() -> list[str]:
    """Names of the patches applied in this process (empty on CUDA machines)."""
    return list(_installed)


def install(*, force: bool = False) -> list[str]:
    """Applies the CPU patches once per process, only when CUDA is absent (or `force`).

    Returns:
        The names of the patches applied (empty when CUDA is present).
    """
    if _installed:
        return list(_installed)
    if torch.cuda.is_available() and not force:
        return []
    check_megatron_version()
    disabled = _disabled()
    for name, patch in PATCHES.items():
        if name in disabled:
            logger.warning("CPU backend: patch %s disabled by OLMOE_CPU_BACKEND_DISABLE", name)
            continue
        patch.apply()
        _installed.append(name)
    return list(_installed)
