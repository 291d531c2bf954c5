"""The streaming dist-checkpoint writer: what Megatron's own save writes, one group at a time."""

from __future__ import annotations

import pytest
import torch

from olmoe_megatron.convert import ConversionError, dist_writer, mcore_io
from olmoe_megatron.convert.errors import atomic_output_dir


def _metadata(directory) -> dict:
    """{key: (global shape, dtype, sorted chunks)} or {key: 'bytes'} of a DCP checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader

    out = {}
    for key, value in FileSystemReader(str(directory)).read_metadata().state_dict_metadata.items():
        if hasattr(value, "chunks"):
            out[key] = (tuple(value.size), value.properties,
                        sorted((tuple(c.offsets), tuple(c.sizes)) for c in value.chunks))
        else:
            out[key] = "bytes"
    return out


def _all_weights(model, ckpt) -> dict[str, torch.Tensor]:
    chunk = mcore_io.build_empty_model(model, dtype=torch.float32)
    outside, layers = mcore_io.group_sharded_by_layer(chunk.sharded_state_dict())
    out = mcore_io.load_entries(ckpt, outside, dtype=torch.float32)
    for entries in layers.values():
        out.update(mcore_io.load_entries(ckpt, entries, dtype=torch.float32))
    return out


def test_written_checkpoint_is_what_megatron_writes(converted, tmp_path):
    """hf-to-mcore's checkpoint, loaded by Megatron's loader and saved again by Megatron's own
    dist_checkpointing.save, has the same tensors, shapes, chunks, dtypes and objects."""
    from olmoe_megatron.checkpoint.weights import load_model, save_model

    model, _, ckpt = converted["olmoe_small"]
    chunk = mcore_io.build_empty_model(model, dtype=torch.float32)
    load_model([chunk], ckpt)
    save_model([chunk], tmp_path / "megatron")
    assert _metadata(ckpt) == _metadata(tmp_path / "megatron")
    ours, theirs = _all_weights(model, ckpt), _all_weights(model, tmp_path / "megatron")
    assert sorted(ours) == sorted(theirs)
    assert not [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert sorted(p.name for p in (tmp_path / "megatron").iterdir() if not p.name.endswith(".distcp")) == \
        sorted(p.name for p in ckpt.iterdir() if p.name in (".metadata", "common.pt", "metadata.json"))


def test_groups_are_produced_once_in_order(converted, tmp_path):
    model, _, _ = converted["olmoe_tiny"]
    sharded = mcore_io.build_empty_model(model, dtype=torch.float32).sharded_state_dict()
    outside, layers = mcore_io.group_sharded_by_layer(sharded)
    groups = {None: outside, **layers}

    def produce(group):  # every tensor of a group holds its group's number (-1 outside the layers)
        return {name: torch.full(tuple(v.data.shape), -1.0 if group is None else float(group))
                for name, v in groups[group].items()}

    produced = dist_writer.write_checkpoint(tmp_path / "ckpt", sharded, produce, dtype=torch.float32)
    assert produced == [None, *range(model.num_layers)]
    for group, entries in groups.items():
        loaded = mcore_io.load_entries(tmp_path / "ckpt", entries, dtype=torch.float32)
        assert all(bool((t == (-1.0 if group is None else group)).all()) for t in loaded.values()), group


def test_a_failing_group_leaves_nothing(converted, tmp_path):
    model, _, _ = converted["olmoe_tiny"]
    sharded = mcore_io.build_empty_model(model, dtype=torch.float32).sharded_state_dict()
    outside, layers = mcore_io.group_sharded_by_layer(sharded)

    def produce(group):
        if group == 1:
            raise ConversionError("cannot read layer 1")
        entries = outside if group is None else layers[group]
        return {name: torch.zeros(tuple(v.data.shape)) for name, v in entries.items()}

    with pytest.raises(ConversionError, match="cannot read layer 1"):
        with atomic_output_dir(tmp_path / "out") as tmp:
            dist_writer.write_checkpoint(tmp, sharded, produce, dtype=torch.float32)
    assert not list(tmp_path.iterdir())

    def wrong_shape(group):
        entries = outside if group is None else layers[group]
        return {name: torch.zeros(tuple(v.data.shape) + (1,)) for name, v in entries.items()}

    with pytest.raises(ConversionError, match=r"embeddings and head: shape mismatch: .*\(model: "):
        dist_writer.write_checkpoint(tmp_path / "bad", sharded, wrong_shape, dtype=torch.float32)
