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
