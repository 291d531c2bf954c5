"""Process groups: created here, once, and handed to the rest of the code as a `ParallelContext`.

Megatron-Core 0.16.1 still reads its `parallel_state` globals inside some modules, so groups are
created through `parallel_state.initialize_model_parallel`; this module is the only caller. The
rest of the project receives a `ParallelContext` (layout, ranks, Megatron's ProcessGroupCollection).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from olmoe_megatron.parallel import backend_patches
from olmoe_megatron.parallel.layout import ParallelLayout

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection

    from olmoe_megatron.model.config import ModelConfig

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ParallelContext:
    """The layout, this rank's coordinates on every axis, and the process groups."""

    layout: ParallelLayout
    backend: str
    world_size: int
    rank: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    dp_size: int
    ep_rank: int
    etp_rank: int
    expert_dp_rank: int
    groups: ProcessGroupCollection

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        """The rank that prints: last pipeline stage (it has the loss), first of everything else."""
        return self.is_last_stage and self.tp_rank == 0 and self.dp_rank == 0 and self.cp_rank == 0

    @property
    def uses_cuda(self) -> bool:
        """Whether this run computes on CUDA devices (the one answer to "is this a GPU run")."""
        return backend_uses_cuda(self.backend)

    @property
    def device(self) -> torch.device:
        if self.uses_cuda:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size}: tp {self.tp_rank} pp {self.pp_rank} cp {self.cp_rank} "
            f"dp {self.dp_rank}/{self.dp_size} ep {self.ep_rank} etp {self.etp_rank}"
        )


def default_backend() -> str:
    """NCCL where torch sees a CUDA device, gloo (CPU) elsewhere."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def backend_uses_cuda(backend: str) -> bool:
    """A run on `backend` computes on CUDA devices (NCCL) or on the CPU (gloo)."""
    return backend == "nccl"


#: torch.distributed's rendezvous variables (torchrun's and Slurm entrypoint's): a process started
#: without them is a world of one (init_distributed).
RENDEZVOUS_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                  "TORCHELASTIC_RUN_ID")


def without_rendezvous(env: dict[str, str]) -> dict[str, str]:
    """`env` less RENDEZVOUS_ENV: the environment of a child process that starts a world of its own."""
    return {k: v for k, v in env.items() if k not in RENDEZVOUS_ENV}


def init_distributed(*, backend: str | None = None, timeout_minutes: float = 10.0) -> str:
    """Starts torch.distributed from the torchrun/Slurm environment (or as one process)."""
    backend = backend or default_backend()
    backend_patches.install()  # what megatron-core lacks here (CUDA, TE, apex), on CPU and GPU
    if dist.is_initialized():
        return dist.get_backend()
    if "RANK" not in os.environ:  # a plain `python` process: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    device_id = None
    if backend_uses_cuda(backend):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device_id = torch.device("cuda", local_cuda_device_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device_id)
    # device_id binds the NCCL communicators (and barriers) to this rank's device, not one guessed
    # from the global rank.
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                            device_id=device_id)
    return backend


def local_cuda_device_index(local_rank: int, device_count: int) -> int:
    """The CUDA device index (among the visible ones) of the rank with `local_rank` on its node.

    torchrun, or srun with every GPU visible to every task, gives a node's 8 ranks 8 devices: rank
    LOCAL_RANK takes device LOCAL_RANK. srun with one GPU bound per task (`--gpus-per-task=1`)
    gives each rank one visible device, index 0, whatever its LOCAL_RANK (0..7).

    Raises:
        RuntimeError: CUDA sees no device (a GPU run on a node or task without a visible GPU).
    """
    if device_count < 1:
        raise RuntimeError(
            f"backend nccl needs a CUDA device, but torch.cuda.device_count()=0 for LOCAL_RANK={local_rank} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}): request GPUs for "
            "every task (sbatch --gpus-per-node / srun --gpus-per-task) or run on CPU with backend gloo"
        )
    if local_rank < 0:
        raise ValueError(f"LOCAL_RANK={local_rank} must be >= 0")
    return local_rank % device_count


def free_port() -> int:
    """A TCP port free on the loopback interface right now (for a local rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _model_parallel_groups(parallel_state) -> list:
    """Every process group megatron's parallel_state holds now (in globals, lists or dicts), once each."""
    found: dict[int, dist.ProcessGroup] = {}
    for value in vars(parallel_state).values():
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if isinstance(item, dist.ProcessGroup):
                found.setdefault(id(item), item)
    return list(found.values())


def destroy_model_parallel_groups() -> None:
    """Megatron's destroy_model_parallel, plus destroying the groups it only forgets.

    megatron-core 0.16.1 destroys its *_GLOO groups but merely drops its references to the others;
    torch keeps them registered, and on gloo each keeps a TCP loop thread waking every 10 ms and two
    worker threads. A process that initializes many layouts (a test pool, a converter called
    repeatedly) collected hundreds of them: at 769 groups a pytest process spent a whole core in
    those wake-ups. Local on every backend (no collective); the default group is kept.
    """
    from megatron.core import parallel_state

    groups = _model_parallel_groups(parallel_state)
    parallel_state.destroy_model_parallel()
    if not dist.is_initialized():
        return
    registered = dist.distributed_c10d._world.pg_map
    world = dist.group.WORLD
    for group in groups:
        if group is not world and group in registered:
            dist.destroy_process_group(group)


def initialize(
    layout: ParallelLayout,
    model: ModelConfig,
    *,
    seed: int,
    backend: str | None = None,
    timeout_minutes: float = 10.0,
) -> ParallelContext:
    """Validates `layout` for `model` on this world and builds Megatron's process groups.

    Safe to call again in the same process with another layout (tests loop over layouts in one
    process group): the previous model-parallel groups are destroyed first.
    """
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    backend = init_distributed(backend=backend, timeout_minutes=timeout_minutes)
    world_size = dist.get_world_size()
    layout.validate(model, world_size, backend=backend)

    destroy_model_parallel_groups()
    # Global state that outlives destroy_model_parallel: the MoE loss tracker is sized by the
    # number of layers on first use.
    get_moe_layer_wise_logging_tracker().clear()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        order=layout.rank_order,
        distributed_timeout_minutes=max(1, int(timeout_minutes)),
    )
    model_parallel_cuda_manual_seed(seed)
    ps = parallel_state
    context = ParallelContext(
        layout=layout,
        backend=backend,
        world_size=world_size,
        rank=dist.get_rank(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        expert_dp_rank=ps.get_expert_data_parallel_rank(),
        groups=ProcessGroupCollection.use_mpu_process_groups(),
    )
    logger.debug("parallel context: %s", context.describe())
    return context
