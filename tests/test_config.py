"""Config machinery: dotted overrides, unknown keys, YAML round trips, error messages."""

import argparse

import pytest

from olmoe_megatron.config import ConfigError
from olmoe_megatron.config.base import dump_yaml, load_yaml, read_yaml_mapping
from olmoe_megatron.launcher.run_args import resolve_run_config
from olmoe_megatron.recipes import get_recipe, list_recipes
from olmoe_megatron.run_config import RunConfig


def test_dotted_overrides_change_fields_and_coerce_types():
    run = get_recipe("olmoe_1b_7b").with_overrides(
        ["--model.num_experts=32", "train.lr=4e-4", "--train.use_distributed_optimizer=false",
         "--train.overlap_param_gather=false", "--parallel.virtual_pipeline_parallel=null"]
    )
    assert run.model.num_experts == 32
    assert run.train.lr == pytest.approx(4e-4) and isinstance(run.train.lr, float)
    assert run.train.use_distributed_optimizer is False
    assert run.parallel.virtual_pipeline_parallel is None
    with pytest.raises(ConfigError, match=r"set train.overlap_param_gather=false with train.use_distributed_optimizer=false"):
        get_recipe("olmoe_1b_7b").with_overrides(["--train.use_distributed_optimizer=false"])
    # the original is untouched (frozen values)
    assert get_recipe("olmoe_1b_7b").model.num_experts == 64


def test_unknown_key_is_an_error_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.num_expert'.*did you mean model.num_experts"):
        get_recipe("olmoe_tiny").with_overrides(["model.num_expert=4"])
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        get_recipe("olmoe_tiny").with_overrides(["trian.lr=1"])


def test_bad_values_name_field_value_and_rule():
    with pytest.raises(ConfigError, match=r"train.lr='fast' must be a number"):
        get_recipe("olmoe_tiny").with_overrides(["train.lr=fast"])
    with pytest.raises(ConfigError, match=r"model.top_k=9 must be between 1 and model.num_experts=8"):
        get_recipe("olmoe_tiny").with_overrides(["model.top_k=9"])
    with pytest.raises(ConfigError, match=r"precision.dtype='fp16' must be one of 'bf16', 'fp32'"):
        get_recipe("olmoe_tiny").with_overrides(["precision.dtype=fp16"])
    with pytest.raises(ConfigError, match="has no value"):
        get_recipe("olmoe_tiny").with_overrides(["--model.num_experts"])


def test_configs_are_frozen():
    run = get_recipe("olmoe_tiny")
    with pytest.raises(Exception):
        run.model.num_experts = 3  # type: ignore[misc]


def test_yaml_round_trip(tmp_path):
    run = get_recipe("olmoe_demo")
    path = tmp_path / "run.yaml"
    path.write_text(dump_yaml(run))
    assert load_yaml(RunConfig, path) == run


def test_yaml_file_over_recipe_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0.002\n  max_steps: 7\nmodel:\n  num_experts: 16\n")
    import argparse

    args = argparse.Namespace(recipe="olmoe_tiny", config=str(path), overrides=["--train.max_steps=9"])
    run = resolve_run_config(args)
    assert (run.train.lr, run.train.max_steps, run.model.num_experts) == (0.002, 9, 16)
    path.write_text("train:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"run.yaml: unknown config key 'train.lrr'"):
        resolve_run_config(argparse.Namespace(recipe="olmoe_tiny", config=str(path), overrides=[]))


def test_recipes_listed_and_unknown_recipe_error():
    names = list_recipes()
    for expected in ("olmoe_1b_7b", "olmoe_tiny", "olmoe_small", "ablation_8e_top1", "ablation_32e_top4",
                     "ablation_64e_top8", "ablation_shared_expert", "ablation_no_lb", "ablation_no_zloss",
                     "ablation_dense"):
        assert expected in names
    with pytest.raises(ConfigError, match="did you mean olmoe_tiny"):
        get_recipe("olmoe_tiyn")


def test_cross_config_rules_on_the_root():
    with pytest.raises(ConfigError, match=r"train.seq_length=8192 exceeds model.max_sequence_length=4096"):
        get_recipe("olmoe_1b_7b").with_overrides(["train.seq_length=8192"])
    run = get_recipe("olmoe_1b_7b")
    with pytest.raises(ConfigError, match=r"train.global_batch_size=1024 must be a multiple of .*8\*256=2048"):
        run.with_overrides(["train.micro_batch_size=8"]).validate_world_size(256)


def test_anneal_and_init_from_rules():
    run = get_recipe("olmoe_tiny")
    with pytest.raises(ConfigError, match=r"train.schedule='anneal'.*--checkpoint.init_from=PRETRAINED_CHECKPOINT"):
        run.with_overrides(["train.schedule=anneal"])
    with pytest.raises(ConfigError, match=r"checkpoint.init_from='/ckpt' needs checkpoint.dir"):
        run.with_overrides(["train.schedule=anneal", "checkpoint.init_from=/ckpt"])
    with pytest.raises(ConfigError, match=r"init_from='/a' and checkpoint.load='/b' both name a checkpoint"):
        run.with_overrides(["checkpoint.init_from=/a", "checkpoint.load=/b", "checkpoint.dir=/d"])
    ok = run.with_overrides(["train.schedule=anneal", "checkpoint.init_from=/a", "checkpoint.dir=/d", "data.seed=7"])
    assert (ok.checkpoint.init_from, ok.train.schedule, ok.data.seed) == ("/a", "anneal", 7)


def test_layout_rules_checked_once_with_the_layouts_own_messages():
    """The run config asks parallel/layout.py (no restated rule): the same message at config time as at launch."""
    from olmoe_megatron.parallel.layout import ParallelLayout

    model = get_recipe("olmoe_1b_7b").model
    cases = [("parallel.pipeline_parallel=3", dict(pipeline_parallel=3)),
             ("parallel.expert_parallel=3", dict(expert_parallel=3)),
             ("parallel.tensor_parallel=3", dict(tensor_parallel=3, sequence_parallel=True))]
    for override, layout in cases:
        with pytest.raises(ConfigError) as at_config:
            get_recipe("olmoe_1b_7b").with_overrides([override, *(["parallel.sequence_parallel=true"]
                                                                   if "tensor" in override else [])])
        with pytest.raises(ConfigError) as at_launch:
            ParallelLayout(**layout).validate(model, ParallelLayout(**layout).smallest_world_size)
        assert str(at_config.value) == str(at_launch.value), override


def test_a_rule_spanning_the_file_and_the_flags_is_judged_on_the_result(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("parallel:\n  tensor_parallel: 2\n")
    args = argparse.Namespace(recipe="olmoe_tiny", config=str(path), overrides=["--parallel.sequence_parallel=true"])
    run = resolve_run_config(args)
    assert (run.parallel.tp, run.parallel.sequence_parallel) == (2, True)
    with pytest.raises(ConfigError, match=r"run.yaml: parallel.sequence_parallel=false with parallel.tensor_parallel=2"):
        resolve_run_config(argparse.Namespace(recipe="olmoe_tiny", config=str(path), overrides=[]))


FP8_SELECTIVE = ["precision.fp8=e4m3", "train.recompute=selective"]


@pytest.mark.parametrize("extra", [[], ["precision.fp8_recipe=delayed"]])
def test_fp8_delayed_scaling_with_selective_recompute_is_refused_at_config_time(extra):
    """Megatron-Core refuses delayed scaling with moe_act recompute (transformer_config.py); we say
    so, with the fix, before any process group starts (delayed is the default recipe)."""
    with pytest.raises(ConfigError, match=r"precision.fp8_recipe='delayed' with train.recompute='selective'.*"
                                          r"set precision.fp8_recipe=tensorwise .*train.recompute=full"):
        get_recipe("olmoe_1b_7b").with_overrides([*FP8_SELECTIVE, *extra])


@pytest.mark.parametrize("overrides", [
    [*FP8_SELECTIVE, "precision.fp8_recipe=tensorwise"],
    [*FP8_SELECTIVE, "precision.fp8_recipe=blockwise"],
    ["precision.fp8=e4m3", "precision.fp8_recipe=delayed", "train.recompute=full"],
    ["precision.fp8=hybrid", "precision.fp8_recipe=delayed"],
    ["train.recompute=selective"],  # bf16: no FP8 rule
    [*FP8_SELECTIVE, "model.expert_impl=sequential"],  # no grouped GEMM: selective leaves moe_act out
])
def test_fp8_with_recompute_combinations_that_megatron_accepts(overrides):
    run = get_recipe("olmoe_1b_7b").with_overrides(overrides)
    assert run.precision.fp8 is not None or run.train.recompute == "selective"


def test_fp8_delayed_selective_on_a_dense_model_has_no_moe_act():
    run = get_recipe("ablation_dense")
    run = run.replace(precision=run.precision.replace(spec="auto", fp8="e4m3"))
    assert run.with_overrides(["train.recompute=selective"]).train.recompute == "selective"


def test_overlap_on_in_the_gpu_recipe_and_cpu_recipes_unchanged():
    gpu = get_recipe("olmoe_1b_7b").train
    assert gpu.overlap_grad_reduce and gpu.use_distributed_optimizer and gpu.ddp_bucket_size is None
    for name in ("olmoe_tiny", "olmoe_small", "olmoe_demo", "ablation_64e_top8", "ablation_dense"):
        train = get_recipe(name).train
        assert not train.overlap_grad_reduce and not train.overlap_param_gather, name
    with pytest.raises(ConfigError, match=r"train.ddp_bucket_size=0 must be >= 1"):
        get_recipe("olmoe_1b_7b").with_overrides(["train.ddp_bucket_size=0"])


@pytest.mark.parametrize("override, match", [
    ("train.lr=nan", r"train.lr='nan' must be a finite number \(it reads as nan\)"),
    ("train.lr=inf", r"train.lr='inf' must be a finite number \(it reads as inf\)"),
    ("train.lr=.inf", r"train.lr=inf must be a finite number"),
    ("train.max_steps=nan", r"train.max_steps='nan' must be a finite integer"),
    ("train.max_steps=1e400", r"train.max_steps='1e400' must be a finite integer \(it reads as inf\)"),
    ("train.seed=inf", r"train.seed='inf' must be a finite integer"),
    ("checkpoint.dir=", r"checkpoint.dir='' is empty; give a path, or null for none"),
    ("checkpoint.load=", r"checkpoint.load='' is empty"),
])
def test_non_finite_numbers_and_empty_paths_are_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        get_recipe("olmoe_tiny").with_overrides([override])


def test_a_key_given_twice_in_a_yaml_file_is_an_error(tmp_path):
    run_file = tmp_path / "run.yaml"
    run_file.write_text("train:\n  lr: 1.0e-3\n  max_steps: 4\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"run.yaml:4: key 'lr' is given twice \(first at line 2\)"):
        load_yaml(RunConfig, run_file)
    with pytest.raises(ConfigError, match=r"config file .* is a directory; give the YAML run file"):
        load_yaml(RunConfig, tmp_path)
    # The same key in two different mappings is fine.
    run_file.write_text("train: {seed: 3}\ndata: {seed: 4}\n")
    assert read_yaml_mapping(run_file) == {"train": {"seed": 3}, "data": {"seed": 4}}
