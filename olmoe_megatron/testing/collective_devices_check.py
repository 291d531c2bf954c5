"""Records the device of every tensor the training metrics hand to torch.distributed collectives.

On a GPU cluster every group is NCCL, which has no CPU backend: a CPU tensor in a collective
raises "No backend type associated with device type cpu". A CPU machine cannot make CUDA tensors,
so the check runs the metric reductions with the default device set to `meta`: a tensor that takes
its device from the default (as a CUDA run's stray CPU tensors do) lands on `meta`, while one
built on `context.device` lands on the CPU. A dispatch mode sees every `c10d` op with its tensors.

`with torch.device("meta")` cannot set that default here: on a machine without CUDA the backend
patches wrap torch's factories (parallel/backend_patches.py, `device_cuda`), and torch's
DeviceContext then no longer recognises them; `_DefaultDevice` matches them by name.
"""

from __future__ import annotations

import collections
import signal

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


_FACTORIES = frozenset({"arange", "empty", "eye", "full", "linspace", "ones", "rand", "randint", "randn",
                        "scalar_tensor", "tensor", "zeros"})


class _DefaultDevice(TorchFunctionMode):
    """Puts tensors that torch's factories build without a `device` on `device`."""

    def __init__(self, device: str):
        super().__init__()
        self.device = torch.device(device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in _FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = self.device
        return func(*args, **kwargs)


class CollectiveDeviceRecorder(TorchDispatchMode):
    """Records (op name, device) for each tensor passed to a torch.distributed (c10d) op."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, torch.device]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "c10d":
            name = func.overloadpacket.__name__
            self.seen.extend((name, leaf.device) for leaf in tree_leaves((args, kwargs)) if torch.is_tensor(leaf))
        return func(*args, **kwargs)


def _summary(recorder: CollectiveDeviceRecorder) -> dict:
    return {"ops": dict(collections.Counter(name for name, _ in recorder.seen)),
            "devices": sorted({str(device) for _, device in recorder.seen})}


def metrics_collective_devices(layout_dict: dict, *, tokens: int = 16, batch: int = 2) -> dict:
    """Runs a training-mode forward of olmoe_tiny, then every per-step metric reduction under the
    recorder; returns the ops and devices seen, the counts before and after the reduction, and a
    control (a tensor left on the default device) that the recorder must catch."""
    from olmoe_megatron.model.build import build_model_chunks
    from olmoe_megatron.model.precision import PrecisionConfig
    from olmoe_megatron.parallel.context import initialize
    from olmoe_megatron.parallel.layout import ParallelLayout
    from olmoe_megatron.recipes import get_recipe
    from olmoe_megatron.training.metrics import job_peak
    from olmoe_megatron.training.moe_metrics import ExpertLoadCounter, reduce_router_losses
    from olmoe_megatron.training.step import _mean_lm_loss
    from olmoe_megatron.training.trainer import _StopSignal

    model = get_recipe("olmoe_tiny").model
    context = initialize(ParallelLayout.from_dict(layout_dict), model, seed=0, backend="gloo")
    chunk = build_model_chunks(model, context, precision=PrecisionConfig(dtype="fp32", spec="local"))[0]
    counter = ExpertLoadCounter(model.num_layers, model.num_experts).attach([chunk])
    chunk.train()
    generator = torch.Generator().manual_seed(context.dp_rank)
    token_ids = torch.randint(0, model.vocab_size, (batch, tokens), generator=generator)
    position_ids = torch.arange(tokens).expand(batch, tokens)
    chunk(token_ids, position_ids, None)  # with autograd: the routers record their losses only then
    counter.detach()
    local_counts = counter.counts_LE.clone()
    counts_device = str(counter.counts_LE.device)

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        with _DefaultDevice("meta"), CollectiveDeviceRecorder() as recorder:
            router = reduce_router_losses(model, context, num_microbatches=1)
            load = counter.reduce_and_reset(context)
            load_after_reset = counter.reduce_and_reset(context)
            peak = job_peak(torch.float32).flops
            stop = _StopSignal().agreed(context)
            lm_loss = _mean_lm_loss([{"lm_loss": torch.tensor(2.0, device=context.device)}], context)
        with _DefaultDevice("meta"), CollectiveDeviceRecorder() as control:
            dist.all_reduce(torch.zeros(2, dtype=torch.float64))  # built on the default device
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return {
        "context_device": str(context.device),
        "counts_device": counts_device,
        "local_counts": local_counts.tolist(),
        "recorded": _summary(recorder),
        "control": _summary(control),
        "router": router,
        "load": load,
        "load_after_reset": load_after_reset,
        "peak_is_positive": peak > 0,
        "stop": stop,
        "lm_loss": lm_loss,
    }


def cpu_tensor_on_cuda_only_group() -> str:
    """All-reduces a CPU tensor on a group whose only backend serves CUDA tensors (gloo registered
    for device type cuda: an NCCL group's situation); returns the error torch raises."""
    group = dist.new_group(backend="cuda:gloo")
    try:
        dist.all_reduce(torch.ones(2), group=group)
    except RuntimeError as exc:
        return str(exc)
    finally:
        dist.destroy_process_group(group)
    return "no error"
