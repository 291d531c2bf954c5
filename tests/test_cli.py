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


@pytest.mark.parametrize("argv, match", [
    (["launch", "-n", "0", "--", "train"], "-n/--nproc-per-node=0 must be at least 1"),
    (["launch", "-n", "-1", "--", "train"], "-n/--nproc-per-node=-1 must be at least 1"),
    (["launch", "--threads-per-proc", "0", "--", "train"], "--threads-per-proc=0 must be at least 1"),
])
def test_launch_refuses_a_bad_process_count(capsys, argv, match):
    assert main(argv) == 2
    assert match in capsys.readouterr().err


CHILD = """
import pathlib, signal, sys, time
marker = pathlib.Path(sys.argv[1])
def stop(signum, frame):
    marker.write_text(signal.Signals(signum).name)
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGUSR1, stop)
marker.with_suffix(".ready").write_text("")
time.sleep(60)
"""

LAUNCHER = """
import sys
from olmoe_megatron.launcher.commands.launch import run_forwarding_signals
sys.exit(run_forwarding_signals([sys.executable, sys.argv[1], sys.argv[2]], env=dict(__import__("os").environ)))
"""


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_launch_passes_signals_on_and_returns_the_childs_code(tmp_path, signame):
    """A scheduler's SIGTERM (or Slurm's SIGUSR1) to `olmoe launch` reaches torchrun and the ranks:
    the launcher waits for them and exits with their code instead of leaving them running."""
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "child.py").write_text(CHILD)
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    marker = tmp_path / "got"
    proc = subprocess.Popen([sys.executable, str(tmp_path / "launcher.py"), str(tmp_path / "child.py"), str(marker)])
    deadline = time.monotonic() + 60
    while not marker.with_suffix(".ready").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the child never started"
        time.sleep(0.05)
    proc.send_signal(getattr(signal, signame))
    assert proc.wait(timeout=30) == 75
    assert marker.read_text() == signame


def test_each_rank_records_its_exit_code_for_the_launcher(tmp_path):
    """torchrun reports any failing rank as 1; `olmoe launch` returns the ranks' own code (75 after
    a stop signal, 76 after non-finite losses) when every rank recorded the same one."""
    import os
    import subprocess
    import sys

    from olmoe_megatron.launcher.commands.launch import ranks_exit_code

    env = {**os.environ, "OLMOE_LAUNCH_EXIT_DIR": str(tmp_path), "RANK": "1"}
    result = subprocess.run([sys.executable, "-m", "olmoe_megatron.launcher.cli", "dry-run", "--recipe", "no_such"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and (tmp_path / "rank_1").read_text() == "2\n"
    (tmp_path / "rank_0").write_text("2\n")
    assert ranks_exit_code(tmp_path, 2, default=1) == 2
    (tmp_path / "rank_0").write_text("75\n")
    assert ranks_exit_code(tmp_path, 2, default=1) == 1  # the ranks disagree: torchrun's code
    (tmp_path / "rank_1").write_text("75\n")
    assert ranks_exit_code(tmp_path, 2, default=1) == 75
    assert ranks_exit_code(tmp_path, 3, default=1) == 1  # rank 2 recorded nothing (killed)
