"""Our side of a conversion: a world-of-one Megatron model that describes the checkpoint, read one
decoder layer at a time (`load_entries`; dist_writer writes it the same way), and the checkpoint
format's lookups with the converters' errors.

The model is built with `perform_initialization=False`: its parameters are `torch.empty` pages the
kernel has not handed out yet, and no converter fills them, so the model costs (almost) nothing.
Its own `sharded_state_dict()` gives the exact keys, shapes, expert axes and SwiGLU factories a
training run writes, so the checkpoint loads in any layout.
"""

from __future__ import annotations

import ctypes
import dataclasses
import re
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

from olmoe_megatron.checkpoint import format as ckpt_format
from olmoe_megatron.config.base import load_yaml
from olmoe_megatron.convert.errors import ConversionError, list_keys
from olmoe_megatron.model.config import ModelConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ConversionError(f"weights of dtype {dtype} are not supported; convert them to bf16 or fp32 first")


def build_empty_model(model: ModelConfig, *, dtype: torch.dtype) -> torch.nn.Module:
    """Our GPTModel in a world of one (tp=pp=ep=1), parameters allocated but not initialised."""
    from olmoe_megatron.model.build import build_model_chunks, build_transformer_config
    from olmoe_megatron.model.precision import PrecisionConfig
    from olmoe_megatron.parallel.context import initialize
    from olmoe_megatron.parallel.layout import ParallelLayout

    context = initialize(ParallelLayout(), model, seed=0, backend="gloo")
    if context.world_size != 1:
        raise ConversionError(
            f"conversion runs as a single process, but this is rank {context.rank} of {context.world_size}; "
            "run `olmoe convert` without torchrun (the checkpoint loads in any layout afterwards)"
        )
    precision = PrecisionConfig(dtype=dtype_name(dtype), spec="local")
    config, _ = build_transformer_config(model, context, precision=precision)
    config = dataclasses.replace(config, perform_initialization=False)
    (chunk,) = build_model_chunks(model, context, precision=precision, config=config)
    return chunk


def release_freed_memory() -> None:
    """Returns freed heap pages to the OS (glibc): after the first large frees, glibc raises its mmap
    threshold and keeps freed layer-sized buffers in the heap, so RSS would grow by a layer per layer."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def layer_index(key: str) -> int | None:
    match = _LAYER.match(key)
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------- checkpoint directories
def resolve_checkpoint(path: str | Path) -> Path:
    """A model checkpoint dir, a training step dir, or a training root (follows its `latest`)."""
    try:
        path = ckpt_format.follow_latest(path)
    except ckpt_format.CheckpointFormatError as err:
        raise ConversionError(str(err)) from err
    if not (path / "metadata.json").is_file():
        raise ConversionError(
            f"{path} is not a Megatron dist checkpoint (no metadata.json) nor a training root with a "
            f"`{ckpt_format.LATEST}` file; pass a model checkpoint dir, a step_XXXXXXX dir or the checkpoint root"
        )
    return path


def read_model_config(ckpt: Path, *, override: str | Path | None = None) -> ModelConfig:
    """`override` (a ModelConfig YAML) if given, else the checkpoint's own (checkpoint.format)."""
    if override is not None:
        return load_yaml(ModelConfig, override)
    try:
        return ckpt_format.read_model_config(ckpt)
    except ckpt_format.CheckpointFormatError as err:
        raise ConversionError(f"{err}; pass --model-config PATH (a ModelConfig YAML)") from err


def checkpoint_dtype(ckpt: Path) -> torch.dtype:
    """The dtype the checkpoint stores its weights in (that of the word embeddings)."""
    metadata = dist_checkpointing.load_tensors_metadata(str(ckpt))
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if key in metadata:
            return metadata[key].dtype
    raise ConversionError(f"{ckpt} holds no embedding or output layer: not an OLMoE model checkpoint")


def check_checkpoint_shapes(ckpt: Path, sharded: dict) -> None:
    """Every tensor the model needs is in the checkpoint with the same global shape."""
    metadata = dist_checkpointing.load_tensors_metadata(str(ckpt))
    wanted: dict[str, tuple[int, ...]] = {}
    for value in sharded.values():
        if isinstance(value, ShardedTensor):
            wanted[value.key] = tuple(value.global_shape)
        elif isinstance(value, ShardedTensorFactory):
            for sub in factory_tensors(value):
                wanted[sub.key] = tuple(sub.global_shape)
    missing = sorted(set(wanted) - set(metadata))
    if missing:
        raise ConversionError(f"{ckpt} lacks tensors this model needs: {list_keys(missing)} "
                              "(is olmoe_model.yaml the checkpoint's architecture?)")
    bad = [f"{k}: {tuple(metadata[k].global_shape)} (model: {s})" for k, s in wanted.items()
           if tuple(metadata[k].global_shape) != s]
    if bad:
        raise ConversionError(f"{ckpt}: shape mismatch between the checkpoint and its model config: {list_keys(bad)}")


def factory_tensors(factory: ShardedTensorFactory) -> list[ShardedTensor]:
    built = factory.build()
    items = built.values() if isinstance(built, dict) else (built if isinstance(built, list) else [built])
    return [t for t in items if isinstance(t, ShardedTensor)]


def group_sharded_by_layer(sharded: dict) -> tuple[dict, dict[int, dict]]:
    """(entries outside the decoder layers, {layer: entries}) of a world-of-one sharded state dict.

    ShardedObjects (`_extra_state`, empty for the local spec) are dropped: only weights are read.
    """
    outside: dict = {}
    layers: dict[int, dict] = {}
    for key, value in sharded.items():
        if isinstance(value, ShardedObject) or key.endswith("_extra_state"):
            continue
        i = layer_index(key)
        (outside if i is None else layers.setdefault(i, {}))[key] = value
    return outside, layers


class _SliceLoadPlanner:
    """A torch DCP load planner that reads given chunks of global tensors into given tensors."""

    def __new__(cls, shards: dict[str, list[tuple[tuple[int, ...], torch.Tensor]]]):
        from torch.distributed.checkpoint import DefaultLoadPlanner
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        class Planner(DefaultLoadPlanner):
            def create_local_plan(self) -> LoadPlan:
                items = []
                for key, local in shards.items():
                    if key not in self.metadata.state_dict_metadata:
                        raise ConversionError(f"the checkpoint has no tensor {key}")
                    chunks = [ChunkStorageMetadata(offsets=torch.Size(o), sizes=t.shape) for o, t in local]
                    items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], chunks)
                return LoadPlan(items)

            def lookup_tensor(self, index):
                return targets[(index.fqn, tuple(index.offset))]

        targets = {(key, tuple(o)): t for key, local in shards.items() for o, t in local}
        return Planner()


def load_entries(ckpt: Path, entries: dict, *, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Loads a subset (one layer) of a world-of-one sharded state dict into fresh tensors.

    Reads through torch DCP with its own planner: Megatron's loader (and torch's ShardedTensor)
    insist that a world of one holds every fragment of a global tensor, so they cannot read one
    layer's slice of the stacked `decoder.layers.*` tensors. The model's own parameters stay untouched.
    """
    import torch.distributed.checkpoint as dcp

    out: dict[str, torch.Tensor] = {}
    shards: dict[str, list] = {}
    for name, value in entries.items():
        data = torch.empty(value.data.shape, dtype=dtype)
        out[name] = data
        pieces = [dataclasses.replace(value, data=data)] if isinstance(value, ShardedTensor) else \
            factory_tensors(dataclasses.replace(value, data=data))
        for piece in pieces:
            assert piece.flattened_range is None, piece.key
            sizes = (1,) * piece.prepend_axis_num + tuple(piece.data.shape)
            shards.setdefault(piece.key, []).append((tuple(piece.global_offset), piece.data.view(sizes)))
    dcp.load({}, storage_reader=dcp.FileSystemReader(str(ckpt)), planner=_SliceLoadPlanner(shards), no_dist=True)
    return out
