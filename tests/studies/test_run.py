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
