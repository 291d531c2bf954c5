"""Training checkpoints: model, optimizer, progress and RNG states, committed atomically.

The directory layout is `olmoe_megatron.checkpoint.format`'s; a training checkpoint adds
    ROOT/step_0000100/rng/      per-rank RNG states (restored when the world size is unchanged)

A save writes everything into ROOT/.step_0000100.tmp; the ranks then hash and flush a stripe of its
files each, rank 0 writes the manifest (olmoe_megatron.checkpoint.manifest: every file with its
size and xxh3 checksum), renames the directory to step_0000100 and only then replaces `latest`
(write + fsync + rename). A process killed during a save therefore
leaves the previous checkpoint, and `latest`, intact; stale temporary directories are removed by
the next save. The model and optimizer keys are global, so a checkpoint saved in one parallel
layout loads into another (with the distributed optimizer's 'fully_reshardable' format; its
'dp_reshardable' format writes each rank's flat shard and reloads only into the same TP/PP/EP
layout). Replicated tensors are written and read fully parallel over the data-parallel ranks.
What a run loads at start is decided by `olmoe_megatron.checkpoint.plan`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from olmoe_megatron.checkpoint.format import (
    LATEST,
    RUN_FILE,
    CheckpointFormatError,
    step_dir_name,
    write_model_config,
    write_run_config,
)
from olmoe_megatron.checkpoint.manifest import describe, list_files, write_manifest
from olmoe_megatron.checkpoint.weights import (
    load_model_state,
    load_sharded,
    load_strategy,
    model_sharded_state_dict,
    save_strategy,
)
from olmoe_megatron.config import ConfigError
from olmoe_megatron.training.step import use_fused_adamw

logger = logging.getLogger(__name__)

# Megatron's recommended reshardable format for the distributed optimizer (its loader needs the
# CPU backend's `dist_opt_step_state` fix without apex/TE; 'fully_sharded_model_space' fails to
# save in 0.16.1: "ShardedTensor.flattened_range is not supported").
# Without chained-optimizer prefixes, optimizer keys are the global parameter names: a layout
# whose experts get their own optimizer (EP > 1) and one where they do not load each other.
def optimizer_metadata(optimizer_format: str = "fully_reshardable", *, mem_efficient: bool = False) -> dict:
    """The metadata Megatron's optimizer.sharded_state_dict takes for a checkpoint format."""
    metadata = {"distrib_optim_sharding_type": optimizer_format, "chained_optim_avoid_prefix": True}
    if mem_efficient:
        metadata["distrib_optim_fully_reshardable_mem_efficient"] = True
    return metadata


@dataclasses.dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    step: int = 0
    consumed_samples: int = 0
    tokens: int = 0
    nonfinite_streak: int = 0


def _rng_state() -> dict:
    """Every RNG state as tensors, ints and strings only, so that `torch.load(weights_only=True)`
    reads it back: loading a checkpoint never unpickles arbitrary objects (numpy's state would)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _load_rng_file(path: Path) -> dict | None:
    """The RNG states of one rank, read without unpickling objects (None: unreadable, with a warning)."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an unreadable or foreign file restores no RNG state
        logger.warning("%s cannot be read as RNG states without running code from it (%s): RNG states not "
                       "restored", path, str(exc).splitlines()[0][:200])
        return None


def _describe_stripe(tmp: Path, rank: int) -> dict[str, dict] | None:
    """Every rank hashes and fsyncs every world_size-th file of the written checkpoint (the files are
    on a filesystem all ranks share); rank 0 gets the manifest entries of all of them (others None)."""
    world = dist.get_world_size()
    names = list_files(tmp)
    mine = describe(tmp, names[rank::world], fsync=True)
    parts = [None] * world if rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    if rank != 0:
        return None
    return {name: entry for part in parts for name, entry in part.items()}


def save_checkpoint(
    root: str | Path,
    *,
    models: list,
    optimizer,
    progress: Progress,
    run_config,
    keep_last: int,
    dp_group: dist.ProcessGroup | None = None,
    before_commit: Callable[[Progress], None] | None = None,
) -> Path:
    """Saves and commits a checkpoint of `progress.step` (collective: every rank calls it).

    Args:
        run_config: the RunConfig; its `checkpoint` section says the optimizer format and whether
            the save is fully parallel.
        dp_group: the data-parallel (with context-parallel) group the fully parallel save spreads
            replicated tensors over (None: no spreading).
        before_commit: called on every rank once its model and optimizer shards are written to
            the temporary directory, before anything is committed (the test fault hooks use it).
    """
    settings = run_config.checkpoint
    root = Path(root)
    name = step_dir_name(progress.step)
    final = root / name
    tmp = root / f".{name}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        tmp.mkdir()
    dist.barrier()
    finish_param_gather(models)
    model_sd = model_sharded_state_dict(models)
    state = {
        **model_sd,
        "optimizer": optimizer.sharded_state_dict(
            model_sd, metadata=optimizer_metadata(settings.optimizer_format,
                                                  mem_efficient=settings.optimizer_mem_efficient)),
        "progress": dataclasses.asdict(progress),
        "world_size": dist.get_world_size(),
        "optimizer_parts": _optimizer_parts(optimizer),
        "optimizer_format": settings.optimizer_format,
        "model_parallel": model_parallel_sizes(run_config.parallel),
    }
    dist_checkpointing.save(state, str(tmp), sharded_strategy=save_strategy(fully_parallel=settings.fully_parallel,
                                                                            group=dp_group))
    if before_commit is not None:
        before_commit(progress)
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    if rank == 0:
        write_run_config(tmp, run_config)
        write_model_config(tmp, run_config.model)
    dist.barrier()
    files = _describe_stripe(tmp, rank)
    if rank == 0:
        write_manifest(tmp, files, step=progress.step)
        os.rename(tmp, final)
        pointer_tmp = root / f".{LATEST}.tmp"
        pointer_tmp.write_text(name + "\n")
        with open(pointer_tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(pointer_tmp, root / LATEST)
        _prune(root, keep_last=keep_last, newest=name)
    dist.barrier()
    logger.info("saved checkpoint %s", final)
    return final


def finish_param_gather(models: list) -> None:
    """With overlapped parameter gather, a step's all-gather of the distributed optimizer's updated
    shards runs in the next forward: before that, each rank's weights hold only its own shard's
    update. Gather now (synchronously; the next forward's gather then fetches the same values), so
    a checkpoint (or an evaluation) sees the weights the optimizer produced, as Megatron-LM does
    before saving and before evaluating."""
    for model in models:
        if getattr(getattr(model, "ddp_config", None), "overlap_param_gather", False):
            model.start_param_sync(force_sync=True)


def _prune(root: Path, *, keep_last: int, newest: str) -> None:
    if keep_last <= 0:
        return
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last]:
        if old.name != newest:
            shutil.rmtree(old, ignore_errors=True)


def _optimizer_parts(optimizer) -> int:
    """Megatron builds one optimizer for dense parameters and, with EP > 1, one for experts."""
    return len(getattr(optimizer, "chained_optimizers", [optimizer]))


def has_optimizer_state(path: Path) -> bool:
    """A training checkpoint (model + optimizer) rather than a model-only one.

    Raises:
        CheckpointFormatError: the checkpoint's common.pt cannot be read, or a checkpoint written
            by training (olmoe_run.yaml beside its shards) has no progress in it: a damaged
            checkpoint must stop a resume, never turn it into a fresh start from step 0.
    """
    from megatron.core.dist_checkpointing import load_common_state_dict

    fix = (f"restore it from a copy, resume from an older step (--checkpoint.load={path.parent}/step_XXXXXXX), "
           "or load the weights alone with --checkpoint.load_optimizer=false")
    try:
        common = load_common_state_dict(str(path)) or {}
    except Exception as exc:  # noqa: BLE001 - torch.load of a truncated or foreign file raises many kinds
        raise CheckpointFormatError(f"{path / 'common.pt'} cannot be read ({type(exc).__name__}: "
                                    f"{str(exc)[:200]}); {fix}") from None
    if "progress" in common:
        return True
    if (path / RUN_FILE).is_file():
        raise CheckpointFormatError(f"{path / 'common.pt'} lacks the training progress every checkpoint saved by "
                                    f"training holds (keys: {sorted(map(str, common))[:8]}): it is damaged; {fix}")
    return False


def optimizer_has_state(optimizer) -> bool:
    """Whether any part of the optimizer holds Adam state (it has stepped, or state was loaded)."""
    return any(sub.optimizer.state for sub in getattr(optimizer, "chained_optimizers", [optimizer]))


def _materialize_optimizer_state(optimizer) -> None:
    """Gives a fresh optimizer its Adam state (step, moments) so a checkpoint can load into it.

    Megatron-Core's distributed optimizer builds its state dict from the inner torch Adam's
    state, which is empty before the first step (without apex/TE that fails an assert). One step
    with zero gradients, zero lr and zero decay creates the state without moving any weight; the
    checkpoint then overwrites it.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(sub, DistributedOptimizer) or sub.optimizer.state:
            continue
        inner = sub.optimizer
        saved = [(g.get("lr"), g.get("weight_decay")) for g in inner.param_groups]
        for group in inner.param_groups:
            group["lr"], group["weight_decay"] = 0.0, 0.0
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        inner.step()
        inner.zero_grad(set_to_none=True)
        for group, (lr, decay) in zip(inner.param_groups, saved):
            group["lr"], group["weight_decay"] = lr, decay


def model_parallel_sizes(layout) -> dict[str, int | None]:
    """The sizes a 'dp_reshardable' optimizer state is tied to (all but data parallelism)."""
    return {"tensor_parallel": layout.tp, "pipeline_parallel": layout.pp, "virtual_pipeline_parallel": layout.vpp,
            "context_parallel": layout.cp, "expert_parallel": layout.ep, "expert_tensor_parallel": layout.etp}


def _check_dp_reshardable(path: Path, saved: dict | None, layout) -> None:
    if layout is None or saved is None or saved == model_parallel_sizes(layout):
        return
    now = model_parallel_sizes(layout)
    changed = ", ".join(f"parallel.{k}: {saved.get(k)} -> {now[k]}" for k in now if saved.get(k) != now[k])
    raise ConfigError(
        f"{path} holds the distributed optimizer's state in checkpoint.optimizer_format='dp_reshardable', which "
        f"loads only into the layout that saved it except for data parallelism ({changed}); resume with the saved "
        "sizes, load the weights only with --checkpoint.load_optimizer=false, or save with "
        "--checkpoint.optimizer_format=fully_reshardable to change the layout")


def load_checkpoint(path: str | Path, *, models: list, optimizer, load_optimizer: bool,
                    dp_group: dist.ProcessGroup | None = None, fully_parallel: bool = True,
                    layout=None, restore_progress: bool = True) -> Progress:
    """Loads `path` into models (and the optimizer); returns the saved progress.

    A model-only checkpoint (a conversion, or load_optimizer=False) restores weights only and
    returns Progress() so training starts at step 0 from these weights. The optimizer state is read
    in the format the checkpoint says it holds; with `fully_parallel` and `dp_group`, each
    data-parallel rank reads a part of the replicated tensors and the parts are exchanged.
    `restore_progress=False` (a new run that keeps the optimizer state: OLMoE's anneal) loads the
    weights and the optimizer state and returns Progress(), the RNG states not restored; the
    checkpoint must then hold optimizer state.
    """
    path = Path(path)
    with_optimizer = load_optimizer and has_optimizer_state(path)
    if load_optimizer and not restore_progress and not with_optimizer:
        raise ConfigError(
            f"checkpoint.init_optimizer=true needs the optimizer state of checkpoint.init_from={str(path)!r}, "
            "which holds model weights only (a conversion or a weights-only save); give a training "
            "checkpoint, or set --checkpoint.init_optimizer=false for a fresh optimizer")
    optimizer_format = "fully_reshardable"
    if with_optimizer:
        from megatron.core.dist_checkpointing import load_common_state_dict

        common = load_common_state_dict(str(path))
        saved_parts = common.get("optimizer_parts", 1)
        optimizer_format = common.get("optimizer_format", "fully_reshardable")
        if optimizer_format == "dp_reshardable":
            _check_dp_reshardable(path, common.get("model_parallel"), layout)
        if saved_parts != _optimizer_parts(optimizer):
            raise ConfigError(
                f"{path} holds optimizer state for a layout {'with' if saved_parts > 1 else 'without'} "
                f"expert parallelism (experts in {'their own' if saved_parts > 1 else 'the dense'} optimizer); "
                f"Megatron-Core cannot map it onto this layout's optimizer. Keep expert_parallel > 1 "
                f"{'' if saved_parts > 1 else 'off '}on both sides, or load the weights only with "
                "--checkpoint.load_optimizer=false (a fresh optimizer; the schedule restarts)"
            )
    model_sd = model_sharded_state_dict(models)
    request: dict = dict(model_sd)
    if with_optimizer:
        _materialize_optimizer_state(optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                            metadata=optimizer_metadata(optimizer_format))
    state = load_sharded(request, path, sharded_strategy=load_strategy(path, fully_parallel=fully_parallel,
                                                                        group=dp_group))
    load_model_state(models, state)
    if not with_optimizer:
        # bf16 keeps fp32 master copies in the optimizer: refresh them from the loaded weights.
        optimizer.reload_model_params()
        logger.info("loaded model weights from %s (optimizer state not loaded)", path)
        return Progress()
    # torch's load_state_dict takes each param group's options (lr, betas, eps, weight decay) from the
    # checkpoint: a resume keeps the saving run's, a new run (restore_progress=False) keeps its own.
    own_options = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    if not restore_progress:
        for group, options in zip(optimizer.param_groups, own_options):
            group.update(options)
    use_fused_adamw(optimizer)  # the loaded param groups carry the saving run's options
    common = dist_checkpointing.load_common_state_dict(str(path))
    saved = Progress(**common["progress"])
    if not restore_progress:
        logger.info("loaded weights and optimizer state from %s (saved at step %d, %d tokens); this run starts "
                    "at step 0", path, saved.step, saved.tokens)
        return Progress()
    progress = saved
    rng_file = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if common.get("world_size") != dist.get_world_size():
        logger.warning("world size changed (%s -> %s): RNG states not restored", common.get("world_size"),
                       dist.get_world_size())
    elif not rng_file.is_file():
        logger.warning("%s is missing: RNG states not restored", rng_file)
    elif (rng_state := _load_rng_file(rng_file)) is not None:
        _set_rng_state(rng_state)
    logger.info("resumed from %s at step %d (%d samples, %d tokens)", path, progress.step,
                progress.consumed_samples, progress.tokens)
    return progress
