"""Study plans: cross products, seeds, the shared data seed and eval, and validation that rejects
the whole study with file:line and writes nothing (no process group)."""

import json

import pytest
import yaml

from olmoe_megatron.studies import builtin_studies, study_file
from olmoe_megatron.studies.plan import resolve_study, write_plan
from olmoe_megatron.studies.spec import StudyError, parse_study

CROSS = """
name: cross
tokens: 204800
seeds: [1, 2]
data_seed: 42
overrides: {precision.dtype: fp32}
eval: {interval: 50, datasets: [{name: heldout, demo_heldout: true}], tokens: 4096}
recipes: [ablation_8e_top1, ablation_64e_top8]
variants:
  base: {}
  lr2: [--train.lr=2e-3]
"""


def test_cross_product_seeds_and_shared_sections(write_study, tmp_path):
    plan = resolve_study(parse_study(write_study(CROSS)), study_dir=tmp_path / "out")
    names = [m.name for m in plan.members]
    assert names == [f"{r}-{v}-seed{s}" for r in ("ablation_8e_top1", "ablation_64e_top8")
                     for v in ("base", "lr2") for s in (1, 2)]
    for member in plan.members:
        cfg = member.config
        assert cfg.train.max_tokens == 204800 and cfg.train.max_steps is None
        assert cfg.train.t_max_tokens == 204800  # fit_schedule: the cosine ends at the budget
        assert cfg.data.seed == 42  # the data order: the same for all
        assert cfg.train.seed == member.seed == int(member.name[-1])  # init: one per seed
        assert cfg.precision.dtype == "fp32"
        assert [s.name for s in cfg.eval.datasets] == ["heldout"] and cfg.eval.interval == 50
        assert cfg.train.lr == (2e-3 if "-lr2-" in member.name else 1e-3)
        assert cfg.checkpoint.dir == str(tmp_path / "out" / "members" / member.name / "checkpoints")
        assert cfg.metrics.jsonl == str(tmp_path / "out" / "members" / member.name / "metrics.jsonl")
        assert member.nproc == 1
    assert plan.members[0].config.model.num_experts == 8 and plan.members[-1].config.model.num_experts == 64


def test_plan_written_atomically_and_member_file_reproduces_config(write_study, tmp_path):
    from olmoe_megatron.launcher.run_args import resolve_run_config
    from argparse import Namespace

    plan = resolve_study(parse_study(write_study(CROSS)), study_dir=tmp_path / "out")
    write_plan(plan)
    written = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert [m["name"] for m in written["members"]] == [m.name for m in plan.members]
    assert written["data_seed"] == 42 and written["budget"] == {"tokens": 204800}
    assert not [p for p in (tmp_path).iterdir() if p.name.startswith(".out.")]  # the temp dir was renamed
    member = plan.members[3]
    sweep = (tmp_path / "out" / "sweep.txt").read_text().splitlines()
    assert sweep[3] == f"--recipe {member.recipe} --config {member.member_file}"
    # What a member runs (`study train-member --recipe R --config member.yaml`) is the planned config.
    args = Namespace(recipe=member.recipe, config=str(member.member_file), overrides=[])
    assert resolve_run_config(args) == member.config
    assert yaml.safe_load(member.member_file.read_text())["train.seed"] == member.seed


@pytest.mark.parametrize("text, match", [
    ("tokens: 100000\nrecipes: [ablation_64e_top8, ablation_no_such]\n", r"study.yaml:2: .*'ablation_no_such' is not a recipe"),
    ("tokens: 1000\nrecipes: [ablation_64e_top8]\nseed: [1]\n", r"study.yaml:3: unknown study key 'seed'; did you mean seeds"),
    ("tokens: 1000\nmembers:\n  - {recipe: ablation_64e_top8, overides: {}}\n", r"study.yaml:3: unknown member key 'overides'"),
    ("tokens: 1000\noverrides:\n  train.lrr: 1\nrecipes: [ablation_64e_top8]\n",
     r"study.yaml:3: unknown config key 'train.lrr'.*did you mean train.lr"),
    ("tokens: 100000\nmembers:\n  - {recipe: ablation_64e_top8}\n  - {name: bad, recipe: ablation_64e_top8, "
     "overrides: {parallel.expert_parallel: 3}}\n", r"study.yaml:4: member 'bad'.*expert_parallel=3 must divide"),
    ("tokens: 100000\nmembers:\n  - {recipe: ablation_64e_top8}\n  - {name: b, recipe: ablation_64e_top8, "
     "overrides: {data.seed: 7}}\n", r"differ in data .*data.seed: 6198 vs 7"),
    ("tokens: 100000\nrecipes: [ablation_64e_top8]\noverrides: {checkpoint.dir: /x}\n",
     r"study.yaml:3: override checkpoint.dir='/x' is set by the study"),
    ("steps: 100\nmembers:\n  - {recipe: ablation_64e_top8}\n  - {name: b, recipe: ablation_64e_top8, "
     "overrides: {train.global_batch_size: 8}}\n", r"use `tokens:` for one token budget"),
    ("tokens: 1000\nrecipes: [ablation_64e_top8]\n", r"fit_schedule set train.t_max_tokens=1000"),
])
def test_invalid_study_rejected_whole_and_nothing_written(write_study, tmp_path, text, match):
    with pytest.raises(StudyError, match=match):
        resolve_study(parse_study(write_study(text)), study_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_rejects_before_writing(write_study, tmp_path, capsys):
    from olmoe_megatron.launcher.cli import main

    path = write_study("tokens: 100000\nmembers:\n  - {recipe: ablation_64e_top8}\n  - {recipe: nope}\n")
    assert main(["study", "run", str(path), "--dir", str(tmp_path / "out")]) == 2
    assert "study.yaml:4" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_changed_config_of_a_started_member_is_refused(write_study, tmp_path):
    plan = resolve_study(parse_study(write_study(CROSS)), study_dir=tmp_path / "out")
    write_plan(plan)
    (plan.members[0].dir / "metrics.jsonl").write_text("")
    changed = resolve_study(parse_study(write_study(CROSS.replace("fp32", "bf16"))), study_dir=tmp_path / "out")
    with pytest.raises(StudyError, match="has already run .*precision.dtype: 'fp32' vs 'bf16'"):
        write_plan(changed)


def test_every_builtin_study_resolves(tmp_path):
    names = builtin_studies()
    assert {"granularity", "shared_expert", "routing", "load_balancing", "zloss", "dense_vs_moe", "upcycling",
            "layouts"} <= set(names)
    for name in names:
        plan = resolve_study(parse_study(study_file(name)), study_dir=tmp_path / name)
        assert len(plan.members) >= 2, name
        if name == "granularity":
            active = {m.config.model.num_params(active=True) for m in plan.members}
            assert max(active) / min(active) < 1.03  # equal active parameters (the router grows with E)
        if name == "layouts":
            assert plan.spec.loss_tolerance is not None and {m.nproc for m in plan.members} == {2}


def test_slurm_array_over_unfinished_members(write_study, tmp_path, capsys):
    from olmoe_megatron.launcher.cli import main

    path = write_study("tokens: 102400\nlaunch: {nproc: 2}\noverrides: {train.micro_batch_size: 2}\nmembers:\n  - {name: a, recipe: ablation_64e_top8}\n"
                       "  - {name: b, recipe: ablation_64e_top8, overrides: {parallel.expert_parallel: 2}}\n"
                       "  - {name: c, recipe: ablation_8e_top1}\n")
    study_dir = tmp_path / "out"
    assert main(["study", "plan", str(path), "--dir", str(study_dir)]) == 0
    (study_dir / "members" / "a" / "done.json").write_text('{"exit_code": 0}')
    capsys.readouterr()
    argv = ["study", "submit", str(study_dir), "--nodes", "1", "--gpus-per-node", "0", "--nproc-per-node", "2",
            "--partition", "cpu", "--dry-run"]
    assert main(argv) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --array=0-1" in script and "#SBATCH --partition=cpu" in script
    assert "set -- " in script and "olmoe study train-member" in script
    lines = (study_dir / "sweep-slurm.txt").read_text().splitlines()
    assert lines == [f"--recipe {r} --config {study_dir.resolve() / 'members' / n / 'member.yaml'}"
                     for n, r in (("b", "ablation_64e_top8"), ("c", "ablation_8e_top1"))]
    # A member that does not fit the job's world size is refused before anything is rendered.
    assert main(argv[:7] + ["--nproc-per-node", "3", "--dry-run"]) == 2
    assert "member 'b' on 3 ranks" in capsys.readouterr().err


SAME_INIT = """
tokens: 102400
seeds: [1, 2]
same_init: true
launch: {nproc: 2}
overrides: {train.micro_batch_size: 2}
members:
  - {name: dp2, recipe: ablation_64e_top8}
  - {name: ep2, recipe: ablation_64e_top8, overrides: {parallel.expert_parallel: 2}}
"""


def test_same_init_gives_every_member_of_a_seed_one_initial_checkpoint(write_study, tmp_path):
    from olmoe_megatron.studies.init import pending_inits

    plan = resolve_study(parse_study(write_study(SAME_INIT)), study_dir=tmp_path / "out")
    init = (tmp_path / "out" / "init").resolve()
    assert {m.name: m.config.checkpoint.init_from for m in plan.members} == {
        "dp2-seed1": str(init / "seed1"), "ep2-seed1": str(init / "seed1"),
        "dp2-seed2": str(init / "seed2"), "ep2-seed2": str(init / "seed2")}
    write_plan(plan)
    written = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert written["same_init"] is True
    # One init per seed, written from the first member of that seed; a written one is not pending.
    assert {d: m["name"] for d, m in pending_inits(written).items()} == {
        str(init / "seed1"): "dp2-seed1", str(init / "seed2"): "dp2-seed2"}
    (init / "seed1").mkdir(parents=True)
    assert list(pending_inits(written)) == [str(init / "seed2")]
    # Without same_init nobody owns checkpoint.init_from and members draw their own weights.
    plain = resolve_study(parse_study(write_study(SAME_INIT.replace("same_init: true", "same_init: false"))),
                          study_dir=tmp_path / "plain")
    assert {m.config.checkpoint.init_from for m in plain.members} == {None}
    assert pending_inits(plain.to_dict()) == {}


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.replace("same_init: true", "same_init: yes please"), r"study.yaml:3: same_init='yes please' must be true or false"),
    (lambda t: t.replace("train.micro_batch_size: 2}", "train.micro_batch_size: 2, checkpoint.init_from: /w}"),
     r"study.yaml:5: override checkpoint.init_from='/w' is set by the study; use the study's initial weights"),
    (lambda t: t.replace("recipe: ablation_64e_top8, overrides", "recipe: ablation_8e_top1, overrides"),
     r"study.yaml:3: same_init gives members 'dp2-seed1' and 'ep2-seed1' one set of initial weights, but their "
     r"model differs \(model.expert_ffn_hidden_size: 64 vs 512; model.num_experts: 64 vs 8"),
    (lambda t: t.replace("{name: dp2, recipe: ablation_64e_top8}", "{name: up, recipe: ablation_upcycled}"),
     r"member 'up-seed1' \(recipe ablation_upcycled\): the recipe starts from checkpoint.init_from="),
])
def test_same_init_rules(write_study, tmp_path, edit, match):
    with pytest.raises(StudyError, match=match):
        resolve_study(parse_study(write_study(edit(SAME_INIT))), study_dir=tmp_path / "out")


def test_slurm_submit_writes_the_init_first_and_the_array_depends_on_it(write_study, tmp_path, capsys, fake_sbatch):
    from olmoe_megatron.launcher.cli import main

    calls = fake_sbatch
    study_dir = tmp_path / "out"
    argv = ["study", "submit", str(write_study(SAME_INIT)), "--dir", str(study_dir), "--nodes", "1",
            "--gpus-per-node", "0", "--nproc-per-node", "2"]
    assert main(argv + ["--dry-run"]) == 0
    script = capsys.readouterr().out
    init_script, array_script = script.split("# --- then, with --dependency=afterok:")
    assert f"olmoe study init {study_dir.resolve()}" in init_script and "--array" not in init_script
    assert "#SBATCH --nodes=1" in init_script and "export OLMOE_NPROC_PER_NODE=1" in init_script
    assert "#SBATCH --array=0-3" in array_script and "olmoe study train-member" in array_script
    assert main(argv) == 0
    first, second = calls.read_text().splitlines()
    assert first == f"--parsable {study_dir.resolve() / 'slurm' / 'study-init.sbatch'}"
    assert second == f"--parsable --dependency=afterok:1 --kill-on-invalid-dep=yes {study_dir.resolve() / 'slurm' / 'study.sbatch'}"
    assert capsys.readouterr().out.split() == ["1", "2"]
    # Once the initial weights exist, a resubmission is the array alone.
    for seed in (1, 2):
        (study_dir / "init" / f"seed{seed}").mkdir(parents=True)
    assert main(argv) == 0
    assert calls.read_text().splitlines()[2] == f"--parsable {study_dir.resolve() / 'slurm' / 'study.sbatch'}"
