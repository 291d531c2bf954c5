"""The `olmoe` command line: dry-run output and config errors (no process group needed)."""

import pytest

from olmoe_megatron.launcher.cli import main


def test_dry_run_olmoe_1b_7b(capsys):
    assert main(["dry-run", "--recipe", "olmoe_1b_7b", "--world-size", "256"]) == 0
    out = capsys.readouterr().out
    assert "parameters          6.919B total, 1.282B active per token" in out
    assert "layout              tp=1 pp=1 cp=1 ep=8 etp=1 dp=256 edp=32 sp=off" in out
    assert "micro-batches/step  1 x 4 sequences per DP rank; global batch 1024 x 4096 = 4,194,304 tokens" in out
    assert "optimizer state" in out and "activations (estimate)" in out
    assert "num_experts: 64" in out  # the resolved YAML


def test_dry_run_config_errors_exit_2(capsys):
    assert main(["dry-run", "--recipe", "olmoe_1b_7b", "--parallel.expert_parallel=3"]) == 2
    assert "parallel.expert_parallel=3 must divide model.num_experts=64; use one of" in capsys.readouterr().err
    assert main(["dry-run", "--recipe", "olmoe_1b_7b", "--world-size", "12"]) == 2
    assert "world_size=12 must be a multiple of expert_tensor_parallel*expert_parallel*pipeline_parallel" in capsys.readouterr().err


def test_unknown_arguments_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["recipes", "--model.num_experts=3"])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_recipes_listing(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "olmoe_1b_7b" in out and "ablation_dense" in out
