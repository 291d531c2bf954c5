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


def test_dry_run_world_size_zero_is_an_error(capsys):
    assert main(["dry-run", "--recipe", "olmoe_tiny", "--world-size", "0", "--quiet-config"]) == 2
    assert "world_size=0 must be >= 1" in capsys.readouterr().err


def test_first_screen_has_no_known_megatron_noise(tmp_path):
    """`olmoe train` prints none of the warnings the structure issue found on every start (their causes
    are fixed, or filtered with the reason next to the filter)."""
    import subprocess
    import sys

    from olmoe_megatron.testing.distributed import standalone_env
    from olmoe_megatron.testing.training_runs import write_synthetic_corpus

    corpus = write_synthetic_corpus(tmp_path / "corpus")
    env = standalone_env(PYTHONWARNINGS="default", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "olmoe_megatron.launcher.cli", "train", "--recipe", "olmoe_tiny",
           f"--data.paths=[{corpus}]", "--data.demo_corpus=false", f"--data.cache_dir={tmp_path / 'index'}",
           "--train.max_steps=1", "--checkpoint.dir=null", "--train.use_distributed_optimizer=true"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    screen = out.stdout + out.stderr
    assert out.returncode == 0, screen[-3000:]
    assert "step      1 | loss" in screen
    for noise in ("Apex is not installed. Falling back to Torch Norm", "full scope is deprecated",
                  "Unknown MLP type", "The .grad attribute of a Tensor that is not a leaf"):
        assert noise not in screen, noise
