"""Writes a Megatron dist checkpoint (torch_dist) group by group, never holding the model.

Megatron's `dist_checkpointing.save` needs the whole model's tensors at once, and torch DCP can
save in several calls only into separate checkpoints. So the converters describe the checkpoint
up front from the world-of-one model's `sharded_state_dict()` (keys, global shapes and offsets,
SwiGLU factories: exactly what a training run writes; the parameters themselves are never
touched) and hand torch DCP a planner whose `resolve_data` produces each tensor on request: the
tensors of one group (the embeddings and head, then decoder layer 0, 1, ...) are produced
together by the caller's function, written in that order, and dropped before the next group.
Peak memory: one group's tensors (about one layer).

The directory holds what `dist_checkpointing.save` writes for a world of one: the DCP
`.metadata` and one `.distcp` file (ShardedTensors as chunks at their global offsets, each
ShardedObject as bytes under its unique key), `common.pt` (an empty common state) and
`metadata.json` (the torch_dist backend); the loaders read it in any layout.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from pathlib import Path
from typing import Callable

import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory, is_main_replica

from olmoe_megatron.convert import mcore_io
from olmoe_megatron.convert.errors import ConversionError, list_keys

logger = logging.getLogger(__name__)

#: A group: None for the tensors outside the decoder layers, else a layer index.
Group = int | None
#: The caller's producer: group -> {state-dict name: tensor} (our names, the model's shapes).
Produce = Callable[[Group], dict[str, torch.Tensor]]


def _pieces(value) -> list[ShardedTensor]:
    if isinstance(value, ShardedTensor):
        return [value]
    assert isinstance(value, ShardedTensorFactory), type(value)
    return mcore_io.factory_tensors(value)


def _chunk(piece: ShardedTensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(global offset, chunk sizes) of a piece, its prepended axes (layer, expert) of size 1."""
    if piece.flattened_range is not None:
        raise ConversionError(f"{piece.key}: flattened shards are not supported by the converter")
    if not is_main_replica(piece.replica_id):
        raise ConversionError(f"{piece.key}: replica {piece.replica_id} in a world of one")
    return tuple(piece.global_offset), (1,) * piece.prepend_axis_num + tuple(piece.data.shape)


class _Source:
    """Produces the tensors of one group at a time and serves its chunks by (key, offset)."""

    def __init__(self, groups: dict[Group, dict], produce: Produce, dtype: torch.dtype):
        self.groups, self.produce, self.dtype = groups, produce, dtype
        self.group_of: dict[tuple[str, tuple[int, ...]], Group] = {}
        for group, entries in groups.items():
            for value in entries.values():
                for piece in _pieces(value):
                    self.group_of[(piece.key, _chunk(piece)[0])] = group
        self.current: Group | str = "none"
        self.chunks: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        self.produced: list[Group] = []
        self.error: BaseException | None = None  # DCP wraps what a producer raises: re-raised as it was

    def _load(self, group: Group) -> None:
        self.chunks = {}
        mcore_io.release_freed_memory()
        entries = self.groups[group]
        tensors = self.produce(group)
        what = "embeddings and head" if group is None else f"layer {group}"
        missing, unknown = set(entries) - set(tensors), set(tensors) - set(entries)
        if missing or unknown:
            raise ConversionError(f"{what}: the mapping left model parameters unset: {list_keys(missing)}"
                                  if missing else f"{what}: converted keys the model does not have: {list_keys(unknown)}")
        bad = [f"{k}: {tuple(tensors[k].shape)} (model: {tuple(v.data.shape)})" for k, v in entries.items()
               if tuple(tensors[k].shape) != tuple(v.data.shape)]
        if bad:
            raise ConversionError(f"{what}: shape mismatch: {list_keys(bad)}")
        for name, value in entries.items():
            data = tensors[name].to(self.dtype)
            for piece in _pieces(dataclasses.replace(value, data=data)):
                offset, sizes = _chunk(piece)
                self.chunks[(piece.key, offset)] = piece.data.reshape(sizes)
        self.current = group
        self.produced.append(group)
        logger.info("wrote %s", what)

    def tensor(self, key: str, offset: tuple[int, ...]) -> torch.Tensor:
        group = self.group_of[(key, offset)]
        if group != self.current:
            try:
                self._load(group)
            except BaseException as exc:
                self.error = exc
                raise
        return self.chunks[(key, offset)]


def _planner(source: _Source, objects: dict[str, object], dtype: torch.dtype):
    """A DCP save planner over `source`'s chunks (in group order) and `objects` (unique key -> data)."""
    from torch.distributed.checkpoint import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    shapes: dict[str, tuple[int, ...]] = {}
    for entries in source.groups.values():
        for value in entries.values():
            for piece in _pieces(value):
                shapes[piece.key] = tuple(piece.global_shape)
    items = [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in objects]
    for entries in source.groups.values():
        for value in entries.values():
            for piece in _pieces(value):
                offset, sizes = _chunk(piece)
                items.append(WriteItem(
                    index=MetadataIndex(piece.key, torch.Size(offset)), type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=torch.Size(offset), sizes=torch.Size(sizes)),
                                                properties=TensorProperties(dtype=dtype), size=torch.Size(shapes[piece.key]))))
    order = {(item.index.fqn, item.index.offset): n for n, item in enumerate(items)}

    class Planner(DefaultSavePlanner):
        def create_local_plan(self) -> SavePlan:
            self.plan = SavePlan(items)
            return self.plan

        def finish_plan(self, new_plan: SavePlan) -> SavePlan:
            # Keep the group order whatever the global planning did: each group is produced once.
            plan = super().finish_plan(new_plan)
            self.plan = dataclasses.replace(plan, items=sorted(plan.items, key=lambda i: order[(i.index.fqn, i.index.offset)]))
            return self.plan

        def resolve_data(self, write_item: WriteItem):
            if write_item.type == WriteItemType.BYTE_IO:
                data = io.BytesIO()
                torch.save([objects[write_item.index.fqn]], data)
                return data
            return source.tensor(write_item.index.fqn, tuple(write_item.index.offset))

    return Planner(flatten_state_dict=False, flatten_sharded_tensors=False)


def write_checkpoint(directory: str | Path, sharded: dict, produce: Produce, *, dtype: torch.dtype) -> list[Group]:
    """Writes the dist checkpoint of a world-of-one model into `directory` (empty or absent).

    Args:
        directory: Where to write (the caller makes it atomic).
        sharded: The model's `sharded_state_dict()`; only its keys, shapes and objects are used.
        produce: group -> that group's tensors by state-dict name; called once per group, in the
            order None (embeddings, final norm, head), 0, 1, ..., num_layers - 1.
        dtype: The dtype of the checkpoint's tensors (each produced tensor is cast to it).

    Returns:
        The groups in the order they were produced (each once).
    """
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    objects = {v.unique_key: v.data for v in sharded.values() if isinstance(v, ShardedObject)}
    outside, layers = mcore_io.group_sharded_by_layer(sharded)
    groups: dict[Group, dict] = {None: outside, **{i: layers[i] for i in sorted(layers)}}
    source = _Source(groups, produce, dtype)
    writer = dcp.FileSystemWriter(str(directory), single_file_per_rank=True, thread_count=1)
    try:
        dcp.save({}, storage_writer=writer, planner=_planner(source, objects, dtype), no_dist=True)
    except BaseException:  # torch's CheckpointException is a BaseException
        if source.error is not None:
            raise source.error from None
        raise
    finally:
        source.chunks = {}
    torch.save({}, directory / COMMON_STATE_FNAME)
    save_config(CheckpointingConfig("torch_dist"), str(directory))
    return source.produced
