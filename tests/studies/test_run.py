"""The local runner on a real run: olmoe_tiny for 2 steps through `olmoe launch`, marked done;
a finished member is skipped, an unfinished one resumes from its checkpoint (about a minute)."""

import json

from olmoe_megatron.studies.plan import resolve_study, write_plan
from olmoe_megatron.studies.runner import member_state, run_local
from olmoe_megatron.studies.spec import parse_study
from olmoe_megatron.testing.distributed import standalone_env
from olmoe_megatron.testing.training_runs import read_metrics, write_synthetic_corpus


def test_local_run_skips_finished_and_resumes(write_study, tmp_path):
    corpus = write_synthetic_corpus(tmp_path / "corpus")
    path = write_study(f"""
        name: tiny
        steps: 2
        fit_schedule: false
        overrides:
          data.paths: [{corpus}]
          data.demo_corpus: false
          data.cache_dir: {tmp_path / 'index'}
        members:
          - {{name: ran, recipe: olmoe_tiny}}
          - {{name: finished_before, recipe: olmoe_tiny, overrides: {{train.lr: 1.0e-3}}}}
        """)
    plan = resolve_study(parse_study(path), study_dir=tmp_path / "study")
    write_plan(plan)
    plan_dict = json.loads((tmp_path / "study" / "plan.json").read_text())
    ran, finished = plan.members
    # The second member counts as finished (its marker is there): it is never launched.
    finished.dir.mkdir(parents=True, exist_ok=True)
    (finished.done_file).write_text('{"exit_code": 0, "status": "finished"}')
    env = standalone_env(OMP_NUM_THREADS="1")

    outcomes = run_local(plan_dict, env=env)
    assert [(o.name, o.state, o.exit_code) for o in outcomes] == [("ran", "finished", 0), ("finished_before", "skipped", 0)]
    assert json.loads(ran.done_file.read_text())["exit_code"] == 0
    assert [r["step"] for r in read_metrics(ran.metrics_file)] == [1, 2]
    assert (ran.dir / "checkpoints" / "latest").exists()
    assert not (finished.dir / "metrics.jsonl").exists()

    # Finished: a second run launches nothing.
    again = run_local(plan_dict, env=env)
    assert [o.state for o in again] == ["skipped", "skipped"]

    # A member killed after its checkpoint (no done.json) resumes there: no step is trained again.
    ran.done_file.unlink()
    assert member_state(plan_dict["members"][0]) == "started"
    resumed = run_local(plan_dict, only=["ran"], env=env)
    assert [(o.name, o.state) for o in resumed] == [("ran", "finished")]
    assert [r["step"] for r in read_metrics(ran.metrics_file)] == [1, 2]


def test_same_init_layouts_start_equal(write_study, tmp_path, capsys):
    """same_init: the study writes one initial checkpoint and an expert-parallel member, which would
    draw other expert weights on its own, trains the data-parallel member's losses step for step."""
    from olmoe_megatron.launcher.cli import main
    from olmoe_megatron.studies.init import INIT_FILE

    corpus = write_synthetic_corpus(tmp_path / "corpus")
    path = write_study(f"""
        name: tiny_layouts
        steps: 2
        fit_schedule: false
        same_init: true
        launch: {{nproc: 2}}
        overrides:
          precision.dtype: fp32
          train.micro_batch_size: 1
          data.paths: [{corpus}]
          data.demo_corpus: false
          data.cache_dir: {tmp_path / 'index'}
        members:
          - {{name: dp2, recipe: olmoe_tiny}}
          - {{name: ep2, recipe: olmoe_tiny, overrides: {{parallel.expert_parallel: 2}}}}
        """)
    study_dir = tmp_path / "study"
    plan = resolve_study(parse_study(path), study_dir=study_dir)
    write_plan(plan)
    dp2, ep2 = plan.members
    # A member started before the initial weights exist is refused with the command that writes them.
    assert main(["study", "train-member", "--recipe", "olmoe_tiny", "--config", str(ep2.member_file)]) == 2
    assert f"run `olmoe study init {study_dir.resolve()}` first" in capsys.readouterr().err
    assert not ep2.metrics_file.exists()

    outcomes = run_local(json.loads((study_dir / "plan.json").read_text()), env=standalone_env(OMP_NUM_THREADS="1"))
    assert [(o.name, o.state) for o in outcomes] == [("dp2", "finished"), ("ep2", "finished")]
    record = json.loads((study_dir / "init" / "seed1234" / INIT_FILE).read_text())
    assert record["seed"] == 1234 and record["member"] == "dp2"
    dp2_losses = [r["lm_loss"] for r in read_metrics(dp2.metrics_file)]
    ep2_losses = [r["lm_loss"] for r in read_metrics(ep2.metrics_file)]
    assert len(dp2_losses) == 2
    assert max(abs(a - b) for a, b in zip(dp2_losses, ep2_losses)) < 1e-5, (dp2_losses, ep2_losses)
