"""Checkpoints that move between specs, and checkpoint files that cannot run code when loaded."""

import pickle
import random

import numpy as np
import torch

from olmoe_megatron.testing.checkpoint_checks import local_checkpoint_into_model_with_extra_state
from olmoe_megatron.testing.distributed import run_on_one_rank
from olmoe_megatron.training import checkpoint


def test_local_spec_checkpoint_loads_into_a_model_with_extra_state(tmp_path):
    """TE modules ask for `_extra_state` entries a local-spec checkpoint lacks: they start from their
    defaults, every weight loads; a real tensor the checkpoint lacks is still an error naming it."""
    r = run_on_one_rank(local_checkpoint_into_model_with_extra_state, {"x": {"directory": str(tmp_path / "ck")}})["x"]
    assert r["weights_equal"] and r["extra_state_kept"], r
    assert r["missing_error"] is not None and "unknown.weight" in r["missing_error"]
    assert "lacks 1 entries this model needs" in r["missing_error"]


def test_rng_states_round_trip_without_pickled_objects(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    state = checkpoint._rng_state()
    torch.save(state, tmp_path / "rank_00000.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    loaded = checkpoint._load_rng_file(tmp_path / "rank_00000.pt")
    assert loaded is not None
    checkpoint._set_rng_state(loaded)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


class _Payload:
    def __reduce__(self):
        return (open, ("PAYLOAD_RAN", "w"))


def test_a_pickle_in_an_rng_file_is_not_run(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "rank_00000.pt"
    with open(path, "wb") as f:
        pickle.dump({"python": _Payload()}, f)
    assert checkpoint._load_rng_file(path) is None
    assert not (tmp_path / "PAYLOAD_RAN").exists()
    assert "cannot be read as RNG states without running code from it" in caplog.text


#: metadata.json of a dist checkpoint (what Megatron-Core writes; it marks the directory as one).
METADATA = ('{"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch", '
            '"common_backend_version": 1}')


def test_a_damaged_common_state_stops_a_resume_instead_of_restarting(tmp_path):
    """A training checkpoint (olmoe_run.yaml beside it) whose common.pt lost its progress, or is
    cut short, is an error naming the file; it was read as a weights-only checkpoint, so training
    restarted at step 1 and pruning then deleted the older, intact checkpoints."""
    import pytest

    from olmoe_megatron.checkpoint.format import CheckpointFormatError

    step = tmp_path / "ckpt" / "step_0000004"
    step.mkdir(parents=True)
    (step / "metadata.json").write_text(METADATA)
    torch.save({"progress": {"step": 4}}, step / "common.pt")
    assert checkpoint.has_optimizer_state(step)
    torch.save({"hello": 1}, step / "common.pt")
    assert not checkpoint.has_optimizer_state(step)  # a weights-only checkpoint (a conversion) has none
    (step / "olmoe_run.yaml").write_text("name: tiny\n")
    with pytest.raises(CheckpointFormatError, match=r"step_0000004/common.pt lacks the training progress .*"
                                                     r"damaged; restore it .*--checkpoint.load_optimizer=false"):
        checkpoint.has_optimizer_state(step)
    (step / "common.pt").write_bytes((step / "common.pt").read_bytes()[:20])
    with pytest.raises(CheckpointFormatError, match=r"step_0000004/common.pt cannot be read"):
        checkpoint.has_optimizer_state(step)
