"""`olmoe analyze trace` on real checkpoints: the store's layout, expert-parallel shards gathered,
the same tokens every time, and no store left behind on bad input."""

import json

import numpy as np
import pytest

from olmoe_megatron.analysis import routing
from olmoe_megatron.analysis.trace import record_trace
from olmoe_megatron.config.base import config_to_dict
from olmoe_megatron.launcher.cli import main
from olmoe_megatron.recipes import get_recipe
from olmoe_megatron.testing.distributed import get_pool
from olmoe_megatron.testing.training_runs import train_run, write_synthetic_corpus


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """olmoe_tiny trained 2 steps under EP2 (experts 4..7 live on rank 1), saved."""
    root = tmp_path_factory.mktemp("ep2")
    corpus = write_synthetic_corpus(root / "synthetic")
    run = config_to_dict(get_recipe("olmoe_tiny"))
    run["data"].update(paths=[corpus], demo_corpus=False, cache_dir=str(root / "index"))
    run["train"].update(max_steps=2)
    run["checkpoint"].update(dir=str(root / "ckpt"), save_interval=1000)
    run["metrics"].update(jsonl=str(root / "metrics.jsonl"))
    run["parallel"].update(expert_parallel=2)
    assert get_pool(2).run(train_run, run) == [0, 0]
    return root, corpus


def test_trace_of_an_expert_parallel_checkpoint(trained, tmp_path):
    root, corpus = trained
    data = f"[{{name: synthetic, paths: [{corpus}]}}]"
    out = tmp_path / "step2.zarr"
    pool = get_pool(1)
    attrs = pool.run(record_trace, str(root / "ckpt"), data=data, tokens=200, out=str(out))[0]
    trace = routing.Trace.open(out)
    assert trace.root["expert_ids"].shape == (4, 200, 2) and trace.root["gate_probs"].shape == (4, 200, 2)
    assert attrs["step"] == 2 and attrs["tokens"] == 2 * 8 * 32 and attrs["seq_length"] == 32
    assert attrs["sources"] == [{"name": "synthetic", "start": 0, "count": 200, "description": corpus + ".bin"}]
    assert trace.root.attrs["model"]["num_experts"] == 8

    ids = np.asarray(trace.root["expert_ids"][:])
    probs = np.asarray(trace.root["gate_probs"][:])
    assert set(np.unique(ids)) == set(range(8))  # both ranks' experts: the shards were gathered
    assert (ids[..., 0] != ids[..., 1]).all()
    assert (probs[..., 0] >= probs[..., 1]).all() and (probs > 0).all() and (probs.sum(-1) <= 1 + 1e-6).all()
    stream = np.fromfile(corpus + ".bin", dtype=np.uint16)[:200]
    assert np.array_equal(np.asarray(trace.root["token_ids"][:]), stream)  # the source's first tokens, in order
    predicted = np.asarray(trace.root["predicted_ids"][:])
    assert predicted.min() >= 0 and predicted.max() < 50280

    again = tmp_path / "again.zarr"
    pool.run(record_trace, str(root / "ckpt" / "step_0000002"), data=data, tokens=200, out=str(again))
    assert np.array_equal(np.asarray(routing.Trace.open(again).root["expert_ids"][:]), ids)

    assert main(["analyze", "domains", str(out)]) == 0
    result = json.loads((tmp_path / "step2.zarr.domains.json").read_text())
    assert result["sources"] == ["synthetic"] and (tmp_path / "step2.zarr.domains.png").stat().st_size > 1000


def test_a_source_too_small_leaves_nothing_behind(trained, tmp_path):
    root, corpus = trained
    out = tmp_path / "big.zarr"
    with pytest.raises(Exception, match=r"fewer than --tokens=10,000,000"):
        get_pool(1).run(record_trace, str(root / "ckpt"), data=f"[{{name: s, paths: [{corpus}]}}]",
                        tokens=10_000_000, out=str(out))
    assert list(tmp_path.iterdir()) == []
    existing = tmp_path / "taken.zarr"
    existing.mkdir()
    with pytest.raises(Exception, match="exists; give a new path"):
        get_pool(1).run(record_trace, str(root / "ckpt"), data=f"[{{name: s, paths: [{corpus}]}}]",
                        tokens=100, out=str(existing))
