"""Model weights through Megatron's dist_checkpointing (torch_dist): saved in one layout, loaded
in any other. Keys are global (layer and expert offsets are part of each ShardedTensor), so a
checkpoint written by TP2+EP2+PP2 loads into a single process and back.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.serialization import StrictHandling

from olmoe_megatron.checkpoint.format import CheckpointFormatError

_EXTRA_STATE = "_extra_state"


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    """Megatron-LM's naming: 'model' for one chunk, 'model0', 'model1', ... for virtual stages."""
    chunks = [getattr(c, "module", c) for c in chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def save_strategy(*, fully_parallel: bool, group: dist.ProcessGroup | None):
    """Megatron's torch_dist save strategy; with `fully_parallel`, the writes of tensors replicated
    over `group` (the data-parallel ranks) are spread over its ranks instead of falling on one."""
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    strategy = get_default_save_sharded_strategy("torch_dist")
    if fully_parallel and group is not None and dist.get_world_size(group) > 1:
        strategy = FullyParallelSaveStrategyWrapper(strategy, group)
    return strategy


def load_strategy(directory: str | Path, *, fully_parallel: bool, group: dist.ProcessGroup | None):
    """The checkpoint's load strategy; with `fully_parallel`, each rank of `group` reads a part of
    what the group's ranks all need and the parts are exchanged (one read of each byte per group)."""
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    strategy = get_default_load_sharded_strategy(str(directory))
    if fully_parallel and group is not None and dist.get_world_size(group) > 1:
        strategy = FullyParallelLoadStrategyWrapper(strategy, group)
    return strategy


def load_sharded(request: dict, directory: str | Path, *, sharded_strategy=None) -> dict:
    """dist_checkpointing.load of `request` that lets module extra state be absent from the checkpoint.

    Transformer Engine's modules keep their FP8 metadata in `_extra_state` entries; a checkpoint
    saved with the local spec (CPU runs, `hf-to-mcore`, `upcycle`) has none, and the TE spec then
    starts with TE's default extra state, as a fresh TE model does. Any other tensor or object that
    the model asks for and the checkpoint lacks is an error naming it.
    """
    state, _, absent = dist_checkpointing.load(request, str(directory), sharded_strategy=sharded_strategy,
                                               strict=StrictHandling.RETURN_UNEXPECTED)
    needed = sorted(key for key in absent if _EXTRA_STATE not in key)
    if needed:
        shown = ", ".join(needed[:8]) + (f" (and {len(needed) - 8} more)" if len(needed) > 8 else "")
        raise CheckpointFormatError(
            f"{directory} lacks {len(needed)} entries this model needs: {shown}; is it a checkpoint of this "
            "architecture (olmoe_model.yaml beside it says which)?"
        )
    return state


def load_model_state(chunks: list[torch.nn.Module], state: dict) -> None:
    """Loads each chunk's entry of `state`; only module extra state (`_extra_state`) may be missing."""
    chunks = [getattr(c, "module", c) for c in chunks]
    names = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for name, chunk in zip(names, chunks):
        result = chunk.load_state_dict(state[name], strict=False)
        missing = [key for key in result.missing_keys if not key.endswith(_EXTRA_STATE)]
        if missing or result.unexpected_keys:
            raise CheckpointFormatError(
                f"{name}: the loaded state does not match the model: missing {missing[:8]}, "
                f"unexpected {list(result.unexpected_keys)[:8]}"
            )


def save_model(chunks: list[torch.nn.Module], directory: str | Path) -> None:
    """Writes only the model weights (collective: every rank calls it)."""
    directory = Path(directory)
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(directory))
    dist.barrier()


def load_model(chunks: list[torch.nn.Module], directory: str | Path) -> None:
    """Loads weights saved by `save_model` (or a full training checkpoint) in any layout."""
    state = load_sharded(model_sharded_state_dict(chunks), directory)
    load_model_state(chunks, state)
