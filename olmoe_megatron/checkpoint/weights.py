"""Model weights through Megatron's dist_checkpointing (torch_dist): saved in one layout, loaded
in any other. Keys are global (layer and expert offsets are part of each ShardedTensor), so a
checkpoint written by TP2+EP2+PP2 loads into a single process and back.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    """Megatron-LM's naming: 'model' for one chunk, 'model0', 'model1', ... for virtual stages."""
    chunks = [getattr(c, "module", c) for c in chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def load_model_state(chunks: list[torch.nn.Module], state: dict) -> None:
    chunks = [getattr(c, "module", c) for c in chunks]
    if len(chunks) == 1:
        chunks[0].load_state_dict(state["model"], strict=True)
    else:
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(state[f"model{i}"], strict=True)


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
    state = dist_checkpointing.load(model_sharded_state_dict(chunks), str(directory))
    load_model_state(chunks, state)
