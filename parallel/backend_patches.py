"""Patches for megatron-core 0.16.1, each applied where what it makes up for is missing.

Megatron-Core assumes CUDA, Transformer Engine (TE) or apex in places: `torch.cuda.current_device()`
as a device argument, CUDA streams and events, a CUDA RNG tracker, `device="cuda"` in factories,
`Tensor.type()` checked against `torch.cuda.*`; names that only exist when TE imports
(`moe_utils.te_general_gemm`, read by every router); an optimizer-state loader written for TE's or
apex's FusedAdam; Python-loop fallbacks for apex's multi-tensor kernels. The all-to-all and
all-gather paths also rely on NCCL behaviour that gloo lacks.

Each patch below is one self-contained unit, written side by side: its `reason`, its condition
(`when`: no CUDA, no TE, neither TE nor apex), the megatron-core releases it was written against,
`apply()`, and `probe()` (True while unpatched megatron-core/torch still shows the problem).
`install()` detects the `Environment` (CUDA, TE, apex, megatron-core version) and applies every
patch whose condition holds, on CPU and GPU alike: a GPU without TE gets the no-TE patches (without
them the first router raises NameError). tests/parallel/test_backend_patches.py checks which patches
are chosen for every CUDA x TE x apex combination, and runs each probe in a fresh process, so a new
megatron-core that no longer needs a patch (or a patch that stops applying) fails a test.

Ablation: OLMOE_BACKEND_PATCHES_DISABLE=name1,name2 skips patches (to show what breaks without them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import logging
import os
import sys
from typing import Callable

import torch

logger = logging.getLogger(__name__)

#: The megatron-core releases the patches were written and tested against.
SUPPORTED_MCORE_VERSIONS = ("0.16.1",)
DISABLE_ENV = "OLMOE_BACKEND_PATCHES_DISABLE"

_installed: list[str] = []


# ----------------------------------------------------------------------------- environment and conditions
def _imports(*modules: str) -> bool:
    """Whether every module imports (what megatron-core's own try/except ImportError sees)."""
    for name in modules:
        if importlib.util.find_spec(name.split(".")[0]) is None:
            return False
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a broken install counts as missing, as in megatron-core
            return False
    return True


@dataclasses.dataclass(frozen=True)
class Environment:
    """What this process has: the facts every patch condition is written in."""

    cuda: bool
    """torch sees a CUDA device."""
    transformer_engine: bool
    """transformer_engine.pytorch imports (megatron-core then uses its kernels and FusedAdam)."""
    apex: bool
    """apex's fused kernels import (amp_C, apex.optimizers; megatron-core's second choice)."""
    megatron_core: str
    """The installed megatron-core version."""

    @classmethod
    def detect(cls) -> "Environment":
        import megatron.core

        return cls(
            cuda=torch.cuda.is_available(),
            transformer_engine=_imports("transformer_engine.pytorch"),
            apex=_imports("amp_C", "apex.optimizers"),
            megatron_core=megatron.core.__version__,
        )


@dataclasses.dataclass(frozen=True)
class Condition:
    """Required values of Environment fields (None: either); holds when all match."""

    description: str
    cuda: bool | None = None
    transformer_engine: bool | None = None
    apex: bool | None = None

    def holds(self, env: Environment) -> bool:
        return all(
            required is None or getattr(env, name) == required
            for name, required in (("cuda", self.cuda), ("transformer_engine", self.transformer_engine),
                                   ("apex", self.apex))
        )


NO_CUDA = Condition("no CUDA", cuda=False)
NO_TE = Condition("no Transformer Engine", transformer_engine=False)
NO_TE_NO_APEX = Condition("neither Transformer Engine nor apex", transformer_engine=False, apex=False)


@dataclasses.dataclass(frozen=True)
class Patch:
    name: str
    reason: str
    when: Condition
    apply: Callable[[], None]
    probe: Callable[[], bool]
    """True while unpatched megatron-core/torch still shows the problem (run before install)."""
    versions: tuple[str, ...] = SUPPORTED_MCORE_VERSIONS
    """megatron-core releases this patch was written for."""


PATCHES: dict[str, Patch] = {}


def _register(patch: Patch) -> None:
    assert patch.name not in PATCHES, patch.name
    PATCHES[patch.name] = patch


def _raises(fn: Callable[[], object]) -> bool:
    try:
        fn()
    except Exception:  # noqa: BLE001 - any failure means the problem is still there
        return True
    return False


# ============================================================================= no CUDA
def _apply_current_device():
    torch.cuda.current_device = lambda: torch.device("cpu")


_register(Patch(
    "current_device",
    "megatron passes torch.cuda.current_device() as device= everywhere; a CPU torch raises 'Torch not "
    "compiled with CUDA enabled'",
    NO_CUDA, _apply_current_device, lambda: _raises(torch.cuda.current_device),
))


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


def _apply_streams():
    torch.cuda.Stream = _NoopStream
    torch.cuda.Event = _NoopEvent
    torch.cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    torch.cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda device=None: None


_register(Patch(
    "streams",
    "MoE dispatch, p2p and checkpoint code create CUDA streams/events and call torch.cuda.synchronize; "
    "on CPU they are no-ops",
    NO_CUDA, _apply_streams, lambda: _raises(torch.cuda.Stream),
))


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


_register(Patch(
    "rng",
    "megatron's RNG tracker forks the CUDA generator; on CPU the default generator plays that role",
    NO_CUDA, _apply_rng, lambda: _raises(lambda: torch.cuda.get_rng_state().sum()),
))


def _apply_tensor_cuda():
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self


_register(Patch(
    "tensor_cuda", "Tensor.cuda()/Module.cuda() calls in megatron keep tensors on CPU",
    NO_CUDA, _apply_tensor_cuda, lambda: _raises(lambda: torch.zeros(1).cuda()),
))


def _apply_nvtx():
    torch.cuda.nvtx.range_push = lambda *args, **kwargs: None
    torch.cuda.nvtx.range_pop = lambda *args, **kwargs: None
    torch.cuda.nvtx.range = lambda *args, **kwargs: contextlib.nullcontext()


_register(Patch(
    "nvtx", "NVTX ranges around MoE and pipeline code need CUDA",
    NO_CUDA, _apply_nvtx, lambda: _raises(lambda: (torch.cuda.nvtx.range_push("x"), torch.cuda.nvtx.range_pop())),
))


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


_register(Patch(
    "device_cuda",
    "schedules, optimizer, clip_grads and utils build tensors with device='cuda' (and pin_memory=True)",
    NO_CUDA, _apply_device_cuda, lambda: _raises(lambda: torch.zeros(1, device="cuda")),
))


def _apply_type_cuda():
    original_type = torch.Tensor.type

    def type_(self, *args, **kwargs):
        name = original_type(self, *args, **kwargs)
        if (not args and not kwargs and isinstance(name, str) and ".cuda." not in name
                and "/megatron/core/" in sys._getframe(1).f_code.co_filename):
            return name.replace("torch.", "torch.cuda.", 1)
        return name

    torch.Tensor.type = type_


def _probe_type_cuda() -> bool:
    """Megatron asserts CUDA type names; a call made from a megatron-core frame must see one."""
    import inspect

    from megatron.core.optimizer import clip_grads

    still_asserted = "torch.cuda.FloatTensor" in inspect.getsource(clip_grads)
    as_seen_by_megatron = eval(compile("t.type()", "/site-packages/megatron/core/probe.py", "eval"), {"t": torch.zeros(1)})
    return still_asserted and ".cuda." not in as_seen_by_megatron


_register(Patch(
    "type_cuda",
    "the optimizer, clip_grads and the distributed optimizer assert Tensor.type() == 'torch.cuda.FloatTensor'",
    NO_CUDA, _apply_type_cuda, _probe_type_cuda,
))


def _apply_a2a_splits():
    from megatron.core.transformer.moe import token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor):
            return tensor.detach().to("cpu").numpy().copy()
        return tensor

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _probe_a2a_splits() -> bool:
    from megatron.core.transformer.moe import token_dispatcher

    return torch.is_tensor(token_dispatcher.maybe_move_tensor_to_cpu(torch.ones(2), as_numpy=True))


_register(Patch(
    "a2a_splits",
    "the alltoall dispatcher converts split sizes to numpy only for CUDA tensors; gloo's "
    "all_to_all_single rejects tensor split sizes",
    NO_CUDA, _apply_a2a_splits, _probe_a2a_splits,
))


class _CompletedWork:
    """What an async collective returns once it has already run synchronously."""

    def wait(self, *args, **kwargs):
        return True

    def is_completed(self):
        return True


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


_register(Patch(
    "gloo_uneven_all_gather",
    "gloo's all_gather needs equal sizes; megatron gathers uneven token counts (alltoall dispatcher "
    "with TP/ETP > 1). Without CUDA the process group is gloo",
    NO_CUDA, _apply_gloo_uneven_all_gather, _probe_gloo_uneven_all_gather,
))


def _apply_no_compile():
    from olmoe_megatron import lazy_jit

    lazy_jit.disable_compile()


def _probe_no_compile() -> bool:
    from megatron.core import jit

    from olmoe_megatron import lazy_jit

    # torch.compile itself, or olmoe_megatron.lazy_jit's first-call torch.compile
    return jit.jit_fuser in (torch.compile, lazy_jit.lazy_compile) and lazy_jit.compiles()


_register(Patch(
    "no_compile",
    "megatron's jit_fuser is torch.compile; on CPU inductor compiles C++ on the first call (5-28 s per "
    "process on 2 cores) for no gain at these sizes: the decorated functions run eagerly",
    NO_CUDA, _apply_no_compile, _probe_no_compile,
))


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


def _probe_fork_results_queue() -> bool:
    import inspect

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    return 'get_context("spawn")' in inspect.getsource(filesystem_async._get_write_results_queue)


_register(Patch(
    "fork_results_queue",
    "dist_checkpointing's async writer starts a 'spawn' Manager that re-imports __main__ (seconds per "
    "save on a CPU, and hangs scripts without a main guard); CUDA processes keep 'spawn' (no fork "
    "after CUDA initialisation)",
    NO_CUDA, _apply_fork_results_queue, _probe_fork_results_queue,
))


# ============================================================================= no Transformer Engine
def _apply_te_gemm_none():
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _probe_te_gemm_none() -> bool:
    from megatron.core.transformer.moe import moe_utils

    return not hasattr(moe_utils, "te_general_gemm")


_register(Patch(
    "te_gemm_none",
    "megatron-core 0.16.1 bug without Transformer Engine: moe_utils.te_general_gemm is defined only when "
    "TE imports but read by every router, which then raises NameError (on a GPU too)",
    NO_TE, _apply_te_gemm_none, _probe_te_gemm_none,
))


def _apply_recompute_fp8():
    from megatron.core.tensor_parallel import random as mrandom

    original_init = mrandom.CheckpointWithoutOutput.__init__

    def __init__(self, fp8=False):
        original_init(self, fp8=None if fp8 is False else fp8)

    mrandom.CheckpointWithoutOutput.__init__ = __init__


def _probe_recompute_fp8() -> bool:
    from megatron.core.tensor_parallel import random as mrandom

    return mrandom.CheckpointWithoutOutput(fp8=False).fp8 is True


_register(Patch(
    "recompute_fp8",
    "megatron-core 0.16.1 bug: CheckpointWithoutOutput(fp8=False) sets fp8=True, and selective recompute "
    "then calls TE's FP8GlobalStateManager, which is undefined without TE",
    NO_TE, _apply_recompute_fp8, _probe_recompute_fp8,
))


# ============================================================================= neither TE nor apex
def _apply_dist_opt_step_state():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        # torch.optim.Adam keeps a per-parameter "step"; its true value is the param groups' step,
        # which load_state_dict has already restored. The per-parameter tensors carry none
        # ('fully_reshardable') or, in 'dp_reshardable', the load template's own 0-d "step" (dist
        # checkpointing does not read 0-d values back), which would overwrite the restored step.
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        # In fp32 the main parameter is a view of the model's, which requires grad.
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


def _probe_dist_opt_step_state() -> bool:
    import inspect

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    setter = inspect.getsource(DistributedOptimizer._set_main_param_and_optimizer_states)
    loader = inspect.getsource(DistributedOptimizer.load_state_dict)
    return ("dst_tensors[key].copy_(tensors[key])" in setter and "step" not in setter) or (
        's["step"] = step\n' in loader
    )


_register(Patch(
    "dist_opt_step_state",
    "megatron-core 0.16.1 bugs with torch's Adam (what it uses without apex and TE): loading a "
    "'fully_reshardable' distributed-optimizer checkpoint copies torch Adam's per-parameter 'step', "
    "which the checkpoint does not hold (KeyError); loading a 'dp_reshardable' one overwrites the restored "
    "step with the load template's (resumed runs lose their bias correction); and it gives all parameters "
    "one shared 'step' tensor that Adam then increments once per parameter",
    NO_TE_NO_APEX, _apply_dist_opt_step_state, _probe_dist_opt_step_state,
))


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """amp_C.multi_tensor_l2norm's contract on torch's foreach kernels: ([total norm], None).

    The norm is `olmoe_megatron.ops.cpu.l2_norm`'s default (foreach) way, the repository's one
    gradient-norm function (the one-pass optimizer step calls it too)."""
    from olmoe_megatron.ops.cpu import l2_norm

    return l2_norm(tensor_lists[0]), None


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


def _probe_foreach_multi_tensor() -> bool:
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    return utils.local_multi_tensor_scale in (clip_grads.multi_tensor_scale_impl, optimizer.multi_tensor_scale_impl) or (
        clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm
    )


_register(Patch(
    "foreach_multi_tensor",
    "speed, not correctness: without apex and TE, megatron's grad-norm, clipping and main-to-model "
    "parameter copies fall back to Python loops with one kernel per tensor and a scaled temporary "
    "(`src * 1.0` to copy); torch's foreach kernels do the same maths (7 -> 3 ms per olmoe_small step "
    "on CPU for the copy and the clip scaling)",
    NO_TE_NO_APEX, _apply_foreach_multi_tensor, _probe_foreach_multi_tensor,
))


# ============================================================================= selection and install
def _disabled() -> set[str]:
    names = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
    unknown = names - PATCHES.keys()
    if unknown:
        raise ValueError(f"{DISABLE_ENV} names unknown patches {sorted(unknown)}; known: {sorted(PATCHES)}")
    return names


def select(env: Environment) -> list[Patch]:
    """The patches whose condition holds in `env`, in registration order.

    Raises:
        RuntimeError: a patch is needed but was written for another megatron-core release.
    """
    chosen = [patch for patch in PATCHES.values() if patch.when.holds(env)]
    stale = [patch.name for patch in chosen if env.megatron_core not in patch.versions]
    if stale:
        raise RuntimeError(
            f"megatron-core {env.megatron_core} is installed, but the patches {', '.join(stale)} (needed here: "
            f"{'; '.join(sorted({PATCHES[n].when.description for n in stale}))}) were written for "
            f"{', '.join(SUPPORTED_MCORE_VERSIONS)}; install megatron-core=={SUPPORTED_MCORE_VERSIONS[-1]} "
            "(each patch has a probe in tests/parallel/test_backend_patches.py to re-check a new release)"
        )
    return chosen


def installed() -> list[str]:
    """Names of the patches applied in this process (empty where nothing is missing)."""
    return list(_installed)


def install(*, environment: Environment | None = None) -> list[str]:
    """Applies, once per process, every patch whose condition holds here.

    Args:
        environment: what to choose for (default: `Environment.detect()`); tests pass one to apply
            the choice of another machine.

    Returns:
        The names of the patches applied.
    """
    if _installed:
        return list(_installed)
    env = environment or Environment.detect()
    disabled = _disabled()
    for patch in select(env):
        if patch.name in disabled:
            logger.warning("backend patch %s disabled by %s", patch.name, DISABLE_ENV)
            continue
        patch.apply()
        _installed.append(patch.name)
    logger.debug("backend patches for %s: %s", env, ", ".join(_installed) or "none")
    return list(_installed)
