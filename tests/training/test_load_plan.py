"""What a run loads at start (checkpoint.plan): pure, no process group, on fake checkpoint dirs."""

from __future__ import annotations

from pathlib import Path

import pytest

from olmoe_megatron.checkpoint.format import CheckpointFormatError, read_latest, step_dir_name
from olmoe_megatron.checkpoint.manifest import write_manifest_for
from olmoe_megatron.checkpoint.plan import plan_load
from olmoe_megatron.training.config import CheckpointConfig


def _saved(root: Path, step: int, *, latest: bool = True) -> Path:
    """A root whose `latest` names a (fake) committed step directory: one file and its manifest."""
    path = root / step_dir_name(step)
    path.mkdir(parents=True)
    (path / "common.pt").write_bytes(b"x" * 10)
    write_manifest_for(path, step=step)
    if latest:
        (root / "latest").write_text(step_dir_name(step) + "\n")
    return path


def test_no_load():
    plan = plan_load(CheckpointConfig(dir=None, load=None))
    assert plan.path is None


def test_load_latest_without_a_saved_checkpoint(tmp_path):
    assert plan_load(CheckpointConfig(dir=str(tmp_path / "ckpt"))).path is None  # the default load='latest'
    assert plan_load(CheckpointConfig(dir=None)).path is None


def test_load_latest_resumes_with_all_state(tmp_path):
    step = _saved(tmp_path, 3)
    plan = plan_load(CheckpointConfig(dir=str(tmp_path)))
    assert (plan.path, plan.load_optimizer, plan.reset_data_position) == (step, True, False)


def test_load_a_path(tmp_path):
    step = _saved(tmp_path / "other", 5)
    assert plan_load(CheckpointConfig(dir=str(tmp_path / "own"), load=str(step))).path == step
    assert plan_load(CheckpointConfig(dir=str(tmp_path / "own"), load=str(tmp_path / "other"))).path == step  # a root
    model_only = tmp_path / "converted"
    model_only.mkdir()
    write_manifest_for(model_only)
    assert plan_load(CheckpointConfig(load=str(model_only))).path == model_only


def test_load_optimizer_false_and_reset_data_position(tmp_path):
    step = _saved(tmp_path, 2)
    plan = plan_load(CheckpointConfig(dir=str(tmp_path), load_optimizer=False))
    assert (plan.path, plan.load_optimizer, plan.reset_data_position) == (step, False, False)
    plan = plan_load(CheckpointConfig(dir=str(tmp_path), reset_data_position=True))
    assert (plan.path, plan.load_optimizer, plan.reset_data_position) == (step, True, True)


def test_init_from_is_a_new_run_from_weights(tmp_path):
    pretrained = _saved(tmp_path / "pre", 3)
    for options in ({}, {"load_optimizer": True, "reset_data_position": True}):
        plan = plan_load(CheckpointConfig(dir=str(tmp_path / "anneal"), init_from=str(tmp_path / "pre"), **options))
        assert (plan.path, plan.load_optimizer, plan.reset_data_position) == (pretrained, False, False)


def test_init_from_after_the_run_has_saved_resumes_the_run(tmp_path):
    _saved(tmp_path / "pre", 3)
    own = _saved(tmp_path / "anneal", 2)
    # all of its own state (the data position too), whatever the other settings say
    plan = plan_load(CheckpointConfig(dir=str(tmp_path / "anneal"), init_from=str(tmp_path / "pre"),
                                      load_optimizer=False, reset_data_position=True))
    assert (plan.path, plan.load_optimizer, plan.reset_data_position) == (own, True, False)


def test_a_missing_path_names_its_field(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"^checkpoint\.load='.*nowhere': no such checkpoint directory"):
        plan_load(CheckpointConfig(load=missing))
    with pytest.raises(FileNotFoundError, match=r"^checkpoint\.init_from='.*nowhere': no such checkpoint directory"):
        plan_load(CheckpointConfig(dir=str(tmp_path / "ckpt"), init_from=missing))


def test_a_dangling_latest_is_an_error(tmp_path):
    (tmp_path / "latest").write_text("step_0000009\n")
    with pytest.raises(CheckpointFormatError, match=r"latest names step_0000009, which does not exist"):
        read_latest(tmp_path)
    with pytest.raises(FileNotFoundError, match="which does not exist"):
        plan_load(CheckpointConfig(dir=str(tmp_path)))


@pytest.mark.parametrize("content, match", [
    ("", r"latest holds '', not a step directory name like step_0000100"),
    ("garbage\n", r"latest holds 'garbage', not a step directory name"),
    ("../outside/step_0000002\n", r"latest holds '../outside/step_0000002', not a step directory name"),
    (b"\xff\xfe\x00", r"latest cannot be read as a step directory name"),
])
def test_a_latest_that_names_no_step_directory_is_an_error_with_the_fix(tmp_path, content, match):
    (tmp_path / "outside" / "step_0000002").mkdir(parents=True)
    root = tmp_path / "ckpt"
    root.mkdir()
    pointer = root / "latest"
    pointer.write_bytes(content) if isinstance(content, bytes) else pointer.write_text(content)
    with pytest.raises(CheckpointFormatError, match=match + r".*write the name of the newest complete step directory"):
        read_latest(root)
    with pytest.raises(CheckpointFormatError, match=match):
        plan_load(CheckpointConfig(dir=str(root)))


def test_a_file_named_as_the_checkpoint_is_an_error(tmp_path):
    (tmp_path / "ck").write_text("not a checkpoint")
    with pytest.raises(CheckpointFormatError, match=r"checkpoint.load='.*ck' is a file, not a checkpoint directory"):
        plan_load(CheckpointConfig(load=str(tmp_path / "ck")))
    with pytest.raises(CheckpointFormatError, match=r"checkpoint.init_from='.*ck' is a file"):
        plan_load(CheckpointConfig(dir=str(tmp_path / "run"), init_from=str(tmp_path / "ck")))


def test_an_incomplete_checkpoint_is_refused_or_passed_over_when_asked(tmp_path):
    older = _saved(tmp_path, 2, latest=False)
    newest = _saved(tmp_path, 4)
    (newest / "common.pt").write_bytes(b"x" * 3)
    with pytest.raises(CheckpointFormatError, match=r"checkpoint.load: checkpoint .*step_0000004 is incomplete: "
                                                    r".*common.pt is truncated: 3 bytes, the manifest says 10"):
        plan_load(CheckpointConfig(dir=str(tmp_path)))
    plan = plan_load(CheckpointConfig(dir=str(tmp_path), fallback_to_complete=True))
    assert plan.path == older and "fell back to the newest complete checkpoint, step_0000002" in plan.reason
    (tmp_path / "latest").write_text("step_0000009\n")  # a dangling latest: the same fallback
    assert plan_load(CheckpointConfig(dir=str(tmp_path), fallback_to_complete=True)).path == older
    plan = plan_load(CheckpointConfig(dir=str(tmp_path / "anneal"), init_from=str(tmp_path), fallback_to_complete=True))
    assert plan.path == older and plan.field == "checkpoint.init_from"
    (older / "common.pt").unlink()
    with pytest.raises(CheckpointFormatError, match=r"no complete checkpoint is left in"):
        plan_load(CheckpointConfig(dir=str(tmp_path), fallback_to_complete=True))
    bare = tmp_path / "bare"  # no manifest (a version without them): the dist checkpoint files must be there
    bare.mkdir()
    with pytest.raises(CheckpointFormatError, match=r"bare is incomplete: .*bare/.metadata is missing \(and 2 more\)"):
        plan_load(CheckpointConfig(load=str(bare)))
